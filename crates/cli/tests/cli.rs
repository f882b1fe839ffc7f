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
        "damaged page",
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

/// Finding 1 of the second reliability pass, as a user meets it: one flipped bit in the
/// superblock hid the newest snapshot and `verify` said "clean".
#[test]
fn a_flipped_bit_in_either_superblock_slot_hides_nothing_and_verify_exits_1() {
    for slot in 0..2usize {
        let env = Env::new();
        env.ok(&["init"]);
        let img = env.path("v.img");
        std::fs::write(&img, image(16, 9)).expect("write");
        let id = env.snapshot(&img);
        let sb = env.store().join("superblock");
        let mut bytes = std::fs::read(&sb).expect("superblock");
        bytes[slot * 4096 + 17] ^= 0x04; // inside the generation field
        std::fs::write(&sb, &bytes).expect("flip");
        let listed = env.ok(&["list"]);
        assert!(
            listed
                .lines()
                .any(|l| l.trim_start().starts_with(&id.to_string())),
            "slot {slot}: the snapshot still lists: {listed}"
        );
        let (code, out, _) = env.run(&["verify"]);
        assert_eq!(code, 1, "slot {slot}: verify reports the damage: {out}");
        assert!(
            out.contains("superblock")
                && out.contains(&format!("slot {slot}"))
                && out.contains("using slot"),
            "slot {slot}: names the file, the slot and what it fell back to: {out}"
        );
        let back = env.path("back.img");
        env.ok(&["restore", &id.to_string(), s(&back)]);
        assert_eq!(std::fs::read(&back).expect("read"), image(16, 9));
        // Any writing command rewrites the damaged slot; then the store is clean.
        let (code, _, err) = env.run(&["gc"]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("repaired the superblock"), "{err}");
        assert!(env.ok(&["verify"]).contains("clean"));
    }
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

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// Whether this process runs as root: a file it creates is owned by uid 0.
fn root(env: &Env) -> bool {
    let probe = env.path("uid-probe");
    std::fs::write(&probe, b"").expect("write");
    std::fs::metadata(&probe).expect("stat").uid() == 0
}

#[test]
fn restore_force_over_a_file_keeps_its_mode_and_owner() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    if !root(&env) {
        println!("skipped: not root, so no file owned by another user can be made to restore over");
        return;
    }
    env.ok(&["init"]);
    let img = env.path("disk.img");
    let want = image(50, 21);
    std::fs::write(&img, &want).expect("write");
    env.snapshot(&img);
    let out = env.path("out.img");
    std::fs::write(&out, image(70, 3)).expect("write");
    std::os::unix::fs::chown(&out, Some(1234), Some(1234)).expect("chown");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    env.ok(&["restore", "1", s(&out), "--force"]);
    let m = std::fs::symlink_metadata(&out).expect("stat");
    assert!(m.is_file());
    assert_eq!(m.mode() & 0o7777, 0o640, "mode {:o}", m.mode());
    assert_eq!((m.uid(), m.gid()), (1234, 1234), "owner");
    assert!(
        std::fs::read(&out).expect("read") == want,
        "content differs"
    );
    let left: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn restore_through_a_symlink_writes_its_target_and_keeps_the_link() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("disk.img");
    let want = image(40, 5);
    std::fs::write(&img, &want).expect("write");
    env.snapshot(&img);
    // A link to an existing file: --force needed, then the target is written.
    let real = env.path("real.img");
    std::fs::write(&real, b"old content").expect("write");
    let link = env.path("link.img");
    std::os::unix::fs::symlink("real.img", &link).expect("symlink");
    env.fails(&["restore", "1", s(&link)], 2, "--force");
    assert_eq!(std::fs::read(&real).expect("read"), b"old content");
    env.ok(&["restore", "1", s(&link), "--force"]);
    let m = std::fs::symlink_metadata(&link).expect("lstat");
    assert!(m.file_type().is_symlink(), "the link was replaced");
    assert_eq!(
        std::fs::read_link(&link).expect("readlink"),
        Path::new("real.img")
    );
    assert!(
        std::fs::read(&real).expect("read") == want,
        "target differs"
    );
    // A dangling link: its target is created, the link stays.
    let dangling = env.path("dangling.img");
    let sub = env.path("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    std::os::unix::fs::symlink(sub.join("new.img"), &dangling).expect("symlink");
    env.ok(&["restore", "1", s(&dangling)]);
    assert!(std::fs::symlink_metadata(&dangling)
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert!(std::fs::read(sub.join("new.img")).expect("read") == want);
    // A link into the store is refused after resolving it.
    let into = env.path("into-store.img");
    std::os::unix::fs::symlink(env.store().join("x.img"), &into).expect("symlink");
    env.fails(
        &["restore", "1", s(&into), "--force"],
        2,
        "inside the store",
    );
    assert!(!env.store().join("x.img").exists());
    // A link to a directory is a directory.
    let to_dir = env.path("to-dir");
    std::os::unix::fs::symlink(&sub, &to_dir).expect("symlink");
    env.fails(
        &["restore", "1", s(&to_dir), "--force"],
        2,
        "is a directory",
    );
}

/// A loop device on a file, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

fn loop_device(backing: &Path) -> Result<Loop, String> {
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup -f --show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Loop(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// A device node in the test's directory for the device at `dev` (so that nothing in /dev is at
/// stake, whatever the code under test does to the node).
fn node_like(dev: &Path, at: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::metadata(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let kind = if m.file_type().is_block_device() {
        "b"
    } else {
        "c"
    };
    let r = m.rdev();
    let major = ((r >> 8) & 0xfff) | ((r >> 32) & !0xfff);
    let minor = (r & 0xff) | ((r >> 12) & !0xff);
    let out = std::process::Command::new("mknod")
        .arg(at)
        .args([kind, &major.to_string(), &minor.to_string()])
        .output()
        .map_err(|e| format!("mknod: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mknod: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[test]
fn restore_force_onto_a_block_device_writes_it_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("disk.img");
    // Not a multiple of the page size, and zero pages (every third) that must overwrite old data.
    let mut want = image(300, 11);
    want.truncate(want.len() - 100);
    std::fs::write(&img, &want).expect("write");
    env.snapshot(&img);
    // The device is larger than the image and full of old data.
    let backing = env.path("backing.img");
    let dev_len = 2 * 1024 * 1024;
    std::fs::write(&backing, vec![0xAAu8; dev_len]).expect("write");
    let small_backing = env.path("small-backing.img");
    std::fs::write(&small_backing, vec![0xAAu8; 512 * 1024]).expect("write");
    let (dev, small) = match (loop_device(&backing), loop_device(&small_backing)) {
        (Ok(d), Ok(s)) => (d, s),
        (Err(e), _) | (_, Err(e)) => {
            println!("skipped: loop devices are not available here ({e})");
            return;
        }
    };
    let node = env.path("blk");
    let small_node = env.path("small-blk");
    if let Err(e) = node_like(Path::new(&dev.0), &node)
        .and_then(|()| node_like(Path::new(&small.0), &small_node))
    {
        println!("skipped: cannot make a device node here ({e})");
        return;
    }
    env.fails(&["restore", "1", s(&node)], 2, "--force");
    env.ok(&["restore", "1", s(&node), "--force"]);
    let m = std::fs::symlink_metadata(&node).expect("lstat");
    assert!(m.file_type().is_block_device(), "the node was replaced");
    let got = std::fs::read(&backing).expect("read the device's backing file");
    assert_eq!(got.len(), dev_len, "the device changed size");
    assert!(
        got[..want.len()] == want[..],
        "the device's content differs"
    );
    assert!(
        got[want.len()..].iter().all(|b| *b == 0xAA),
        "bytes past the image were written"
    );
    // Through the device node itself as well.
    let mut via = vec![0u8; want.len()];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&node).expect("open"),
        &mut via,
        0,
    )
    .expect("read");
    assert!(via == want);
    // A device smaller than the image is refused, naming both sizes, and left alone.
    let err = env.fails(&["restore", "1", s(&small_node), "--force"], 2, "smaller");
    assert!(
        err.contains(&want.len().to_string()) && err.contains(&(512 * 1024).to_string()),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(&small_node)
        .expect("lstat")
        .file_type()
        .is_block_device());
    assert!(std::fs::read(&small_backing)
        .expect("read")
        .iter()
        .all(|b| *b == 0xAA));
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A block device holding a mounted file system is refused, even with `--force`, and left alone:
/// writing under a mounted file system destroys it.
#[test]
fn restore_onto_a_mounted_block_device_is_refused() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("disk.img");
    std::fs::write(&img, image(64, 3)).expect("write");
    env.snapshot(&img);
    let backing = env.path("fs.img");
    std::fs::write(&backing, vec![0u8; 8 << 20]).expect("write");
    let made = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&backing)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        println!("skipped: mke2fs is not available here");
        return;
    }
    let dev = match loop_device(&backing) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: loop devices are not available here ({e})");
            return;
        }
    };
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .arg(&dev.0)
        .arg(&mnt)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        println!("skipped: cannot mount a loop device here");
        return;
    }
    let _mounted = Mounted(mnt.clone());
    let node = env.path("blk");
    if let Err(e) = node_like(Path::new(&dev.0), &node) {
        println!("skipped: cannot make a device node here ({e})");
        return;
    }
    let before = std::fs::read(&backing).expect("read");
    env.fails(
        &["restore", "1", s(&node), "--force"],
        2,
        "is mounted or in use",
    );
    assert!(
        std::fs::read(&backing).expect("read") == before,
        "nothing written"
    );
    assert!(
        std::fs::read_dir(&mnt).is_ok(),
        "still mounted and readable"
    );
}

#[test]
fn restore_force_onto_a_character_device_writes_it_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("disk.img");
    std::fs::write(&img, image(20, 2)).expect("write");
    env.snapshot(&img);
    let node = env.path("null");
    if let Err(e) = node_like(Path::new("/dev/null"), &node) {
        println!("skipped: cannot make a device node here ({e})");
        return;
    }
    env.ok(&["restore", "1", s(&node), "--force"]);
    assert!(
        std::fs::symlink_metadata(&node)
            .expect("lstat")
            .file_type()
            .is_char_device(),
        "the node was replaced"
    );
}

#[test]
fn a_sparse_image_is_read_only_where_it_holds_data_and_restored_sparse() {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("vm.img");
    let f = std::fs::File::create(&img).expect("create");
    f.set_len(4 << 30).expect("size");
    // 16 pages of data at 0 and at 1 GiB, 16 unaligned (17 pages touched), 3000 bytes at the end.
    let data: Vec<u8> = (0..16 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
    for at in [0u64, 1 << 30, (3 << 30) + 777] {
        f.write_all_at(&data, at).expect("write");
    }
    f.write_all_at(&data[..3000], (4 << 30) - 3000)
        .expect("write");
    drop(f);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", s(&img), "--json"])).expect("json");
    // 16 + 16 + 17 + 1 pages hold data; not the 1048576 pages of the image.
    assert_eq!(json["image_size"], 4u64 << 30);
    let read = json["pages_read"].as_u64().expect("pages_read");
    assert!((50..=60).contains(&read), "{json}");
    assert_eq!(json["pages_changed"], 50);
    // Unchanged, so read only with --reread.
    let human = env.ok(&["snapshot", s(&img), "--reread"]);
    assert!(
        human.starts_with(&format!("{read} pages read, 0 changed")),
        "{human}"
    );
    let out = env.path("out.img");
    env.ok(&["restore", "1", s(&out)]);
    let (a, b) = (
        std::fs::metadata(&img).expect("stat"),
        std::fs::metadata(&out).expect("stat"),
    );
    assert_eq!(a.len(), b.len());
    assert!(
        b.blocks() * 512 <= 50 * 4096 + (1 << 20),
        "restore is sparse"
    );
    use std::io::Read;
    let (mut ra, mut rb) = (
        std::fs::File::open(&img).expect("open"),
        std::fs::File::open(&out).expect("open"),
    );
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let n = ra.read(&mut ba).expect("read");
        if n == 0 {
            break;
        }
        rb.read_exact(&mut bb[..n]).expect("read");
        assert!(ba[..n] == bb[..n], "restore is byte-identical");
    }
}

fn snapshot_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&env.ok(&all)).expect("json")
}

#[test]
fn an_unchanged_image_is_not_read_unless_reread_and_restores_identical() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("disk.img");
    let data = image(600, 21); // 400 data pages, 200 zero pages
    std::fs::write(&img, &data).expect("write");
    let first = snapshot_json(&env, &[s(&img)]);
    assert_eq!(
        (first["pages_read"].as_u64(), first["unchanged"].as_bool()),
        (Some(600), Some(false))
    );
    let second = snapshot_json(&env, &[s(&img), "--label", "same"]);
    assert_eq!(second["pages_read"], 0, "{second}");
    assert_eq!(second["pages_changed"], 0, "{second}");
    assert_eq!(second["pages_written"], 0, "{second}");
    assert_eq!(second["unchanged"], true, "{second}");
    let human = env.ok(&["snapshot", s(&img)]);
    assert!(
        human.starts_with("0 pages read, 0 changed, 0 new") && human.contains("unchanged"),
        "{human}"
    );
    let forced = snapshot_json(&env, &[s(&img), "--reread"]);
    assert_eq!(
        (
            forced["pages_read"].as_u64(),
            forced["pages_changed"].as_u64()
        ),
        (Some(600), Some(0))
    );
    assert_eq!(forced["unchanged"], false);
    let list = env.list();
    let origin = list[1]["origin"].as_str().expect("origin");
    let canonical = std::fs::canonicalize(&img).expect("canonical");
    assert!(
        origin.starts_with("image v1 dev=")
            && origin.ends_with(&format!("path={}", canonical.display())),
        "{origin}"
    );
    assert_eq!(list[1]["merkle_root"], list[0]["merkle_root"]);
    let out = env.path("out.img");
    env.ok(&["restore", "same", s(&out)]);
    assert!(
        std::fs::read(&out).expect("read") == data,
        "restores identical"
    );
    // One byte changed in place and the modification time put back: read, and recorded.
    let mtime = std::fs::metadata(&img)
        .expect("stat")
        .modified()
        .expect("mtime");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xEE], 301 * 4096 + 5).expect("write");
    f.set_modified(mtime).expect("mtime back");
    drop(f);
    let changed = snapshot_json(&env, &[s(&img)]);
    assert_eq!(
        (
            changed["pages_read"].as_u64(),
            changed["pages_changed"].as_u64()
        ),
        (Some(600), Some(1))
    );
    let id = changed["id"].as_u64().expect("id").to_string();
    env.ok(&["restore", &id, s(&out), "--force"]);
    assert!(std::fs::read(&out).expect("read") == std::fs::read(&img).expect("read"));
}

#[test]
fn a_block_device_snapshots_whole_and_restores_identical() {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    env.ok(&["init"]);
    // 1 MiB and 3 sectors: the last page is partial; every third page zero.
    let mut content = image(257, 31);
    content.truncate((1 << 20) + 1536);
    let backing = env.path("backing.img");
    std::fs::write(&backing, &content).expect("write");
    let dev = match loop_device(&backing) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: loop devices are not available here ({e})");
            return;
        }
    };
    let node = env.path("blk");
    if let Err(e) = node_like(Path::new(&dev.0), &node) {
        println!("skipped: cannot make a device node here ({e})");
        return;
    }
    let pages = content.len().div_ceil(4096) as u64;
    let first = snapshot_json(&env, &[s(&node)]);
    assert_eq!(first["image_size"], content.len() as u64, "{first}");
    assert_eq!(first["pages_read"], pages, "read whole: {first}");
    let out = env.path("out.img");
    env.ok(&["restore", "1", s(&out)]);
    assert!(
        std::fs::read(&out).expect("read") == content,
        "restores identical"
    );
    // Unchanged: a device is still read (its node's times do not follow its blocks).
    let again = snapshot_json(&env, &[s(&node)]);
    assert_eq!(
        (
            again["pages_read"].as_u64(),
            again["pages_changed"].as_u64()
        ),
        (Some(pages), Some(0))
    );
    assert_eq!(again["unchanged"], false);
    // No identity recorded for a device, only its name (here its canonical path: no
    // /dev/disk/by-id link resolves to this node).
    let canonical = std::fs::canonicalize(&node).expect("canonical");
    assert_eq!(
        env.list()[1]["origin"],
        format!("name {}", canonical.display())
    );
    assert_eq!(env.list()[1]["name"], s(&canonical));
    assert_eq!(env.list()[1]["parent"], 1, "the same name's newest");
    // A write through the device, which leaves the node's times alone: seen.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&node)
        .expect("open");
    f.write_all_at(&[0x77; 4096], 4096 * 9).expect("write");
    f.sync_all().expect("sync");
    drop(f);
    content[4096 * 9..4096 * 10].fill(0x77);
    let third = snapshot_json(&env, &[s(&node), "--label", "written"]);
    assert_eq!(third["pages_changed"], 1, "{third}");
    env.ok(&["restore", "written", s(&out), "--force"]);
    assert!(
        std::fs::read(&out).expect("read") == content,
        "restores identical"
    );
    // A character device is still refused.
    let null = env.path("null");
    if node_like(Path::new("/dev/null"), &null).is_ok() {
        env.fails(
            &["snapshot", s(&null)],
            2,
            "not a regular file or a block device",
        );
    }
}

/// A store written by the previous format (fixtures/store-v2) restores the same bytes before and
/// after `pagesnap upgrade`, which says what it did, and says so again when there is nothing to do.
#[test]
fn upgrade_converts_an_older_store_and_every_snapshot_restores_the_same() {
    let env = Env::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/store-v2");
    std::fs::create_dir_all(env.store()).expect("mkdir");
    for e in std::fs::read_dir(&fixture).expect("fixture") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), env.store().join(e.file_name())).expect("copy");
    }
    let before: Vec<Vec<u8>> = ["1", "3", "4"]
        .iter()
        .map(|id| {
            let out = env.path(&format!("before-{id}.img"));
            env.ok(&["restore", id, out.to_str().expect("utf-8")]);
            std::fs::read(&out).expect("read")
        })
        .collect();
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["info", "--json"])).expect("json");
    assert_eq!(info["format_version"], 2);
    let out = env.ok(&["upgrade"]);
    assert!(
        out.contains("from format 2 to format 4") && out.contains("3 snapshot(s)"),
        "{out}"
    );
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["info", "--json"])).expect("json");
    assert_eq!(info["format_version"], 4);
    assert!(env.ok(&["verify"]).contains("clean"));
    for (id, want) in ["1", "3", "4"].iter().zip(&before) {
        let out = env.path(&format!("after-{id}.img"));
        env.ok(&["restore", id, out.to_str().expect("utf-8")]);
        assert!(&std::fs::read(&out).expect("read") == want, "snapshot {id}");
    }
    assert!(env.ok(&["upgrade"]).contains("nothing to do"));
}

/// Every file of a directory and its bytes (to show a command changed nothing).
fn dir_contents(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(p)
        .expect("dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name() != "lock")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect();
    files.sort();
    files
}

/// Two images in one store, by name: per-name parents, `NAME:latest` / `NAME:LABEL` arguments,
/// `forget` per name with `--prune`, and every kept snapshot restoring byte-identical after it.
#[test]
fn two_images_by_name_forget_prune_and_every_kept_snapshot_restores() {
    let env = Env::new();
    env.ok(&["init"]);
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    // (id, name, image bytes as snapshotted)
    let mut taken: Vec<(u64, &str, Vec<u8>)> = Vec::new();
    for round in 0..4u64 {
        for (img, name, seed) in [(&a, "vm-a", 10), (&b, "vm-b", 20)] {
            let mut data = image(256, seed);
            // A change per round: one page of its own.
            data[(round as usize + 1) * 4096] ^= 0xff;
            std::fs::write(img, &data).expect("write");
            let label = format!("r{round}");
            let out = env.ok(&["snapshot", s(img), "--name", name, "--label", &label]);
            let id: u64 = out.lines().last().and_then(|l| l.parse().ok()).expect("id");
            taken.push((id, name, data));
        }
    }
    let list = env.list();
    let rows = list.as_array().expect("array");
    assert_eq!(rows.len(), 8);
    for row in rows {
        let id = row["id"].as_u64().expect("id");
        let name = row["name"].as_str().expect("name");
        let expect = taken.iter().find(|t| t.0 == id).expect("taken").1;
        assert_eq!(name, expect);
        // The parent is the previous snapshot of the same name (two ids back), not the store's
        // newest, so each commit changed exactly its one page (and the page it put back).
        if id > 2 {
            assert_eq!(row["parent"].as_u64(), Some(id - 2), "{row}");
            assert_eq!(row["pages_changed"].as_u64(), Some(2), "{row}");
        }
    }
    let names_only: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--name", "vm-b", "--json"])).expect("json");
    assert_eq!(names_only.as_array().map(Vec::len), Some(4));
    // Arguments by name: NAME:latest, NAME:LABEL; diff across names.
    let restored = |arg: &str| {
        let out = env.path("out.img");
        env.ok(&["restore", arg, s(&out), "--force"]);
        std::fs::read(&out).expect("read")
    };
    assert!(restored("vm-a:latest") == taken[6].2);
    assert!(restored("vm-b:r1") == taken[3].2);
    assert!(
        restored("r1") == taken[3].2,
        "a bare label: the newest with it"
    );
    let d: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", "vm-a:r0", "vm-b:r0", "--json"])).expect("json");
    assert_eq!((d["a"].as_u64(), d["b"].as_u64()), (Some(1), Some(2)));
    env.fails(
        &["restore", "vm-a:r9", s(&env.path("x.img"))],
        2,
        "no snapshot of image name 'vm-a' has the label 'r9'",
    );
    // Dry run: what would go and why, nothing changed.
    let before = dir_contents(&env.store());
    let plan: serde_json::Value =
        serde_json::from_str(&env.ok(&["forget", "--keep-last", "2", "--dry-run", "--json"]))
            .expect("json");
    assert_eq!(plan["removed"], serde_json::json!([1, 2, 3, 4]));
    let kept: Vec<_> = plan["snapshots"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["keep"] == true)
        .map(|r| (r["id"].as_u64().expect("id"), r["reasons"].clone()))
        .collect();
    assert_eq!(kept.len(), 4);
    assert!(kept
        .iter()
        .all(|(_, why)| why == &serde_json::json!(["last"])));
    assert!(
        dir_contents(&env.store()) == before,
        "a dry run changes nothing"
    );
    let human = env.ok(&["forget", "--keep-last", "2", "--dry-run"]);
    assert!(
        human.contains("image name vm-a:") && human.contains("no rule keeps it"),
        "{human}"
    );
    // Only one name.
    let out = env.ok(&["forget", "--name", "vm-b", "--keep-last", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["removed"], serde_json::json!([2, 4, 6]));
    // Then every name, pruned.
    let out = env.ok(&[
        "forget",
        "--keep-last",
        "2",
        "--keep-within",
        "0d1h",
        "--prune",
    ]);
    assert!(out.contains("freed"), "{out}");
    let left: Vec<u64> = env
        .list()
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["id"].as_u64().expect("id"))
        .collect();
    // keep-within 1h of each name's newest keeps all of vm-a (taken within seconds).
    assert_eq!(left, vec![1, 3, 5, 7, 8]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["info", "--json"])).expect("json");
    assert_eq!(info["reclaimable_bytes"], 0, "pruned");
    assert!(env.ok(&["verify"]).contains("clean"));
    for id in left {
        let want = &taken.iter().find(|t| t.0 == id).expect("taken").2;
        assert!(
            &restored(&id.to_string()) == want,
            "snapshot {id} after forget --prune"
        );
    }
    let names: Vec<_> = info["names"]
        .as_array()
        .expect("names")
        .iter()
        .map(|n| (n["name"].clone(), n["snapshots"].clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            (serde_json::json!("vm-a"), serde_json::json!(4)),
            (serde_json::json!("vm-b"), serde_json::json!(1))
        ]
    );
}

/// An unknown name, an empty policy, a bad duration or name: one clear line, exit 2, the store
/// untouched.
#[test]
fn bad_names_and_policies_change_nothing() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("a.img");
    std::fs::write(&img, image(64, 3)).expect("write");
    env.ok(&["snapshot", s(&img), "--name", "web"]);
    env.ok(&["snapshot", s(&img), "--name", "web"]);
    let before = dir_contents(&env.store());
    env.fails(
        &["forget", "--name", "nope", "--keep-last", "1"],
        2,
        "unknown image name 'nope'",
    );
    env.fails(&["list", "--name", "nope"], 2, "the store has 'web'");
    env.fails(&["forget"], 2, "no retention policy given");
    env.fails(
        &["forget", "--name", "web", "--keep-daily", "0"],
        2,
        "would remove every snapshot",
    );
    env.fails(
        &["forget", "--keep-within", "0d"],
        2,
        "no retention policy given",
    );
    // Refused by the argument parser (clap's usage hint follows its one-line error).
    for (args, words) in [
        (&["forget", "--keep-within", "3w"][..], "bad duration '3w'"),
        (&["forget", "--keep-last", "many"][..], "--keep-last"),
    ] {
        let (code, _, err) = env.run(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(words), "{err}");
    }
    env.fails(&["snapshot", s(&img), "--name", "42"], 2, "all digits");
    env.fails(
        &["snapshot", s(&img), "--name", "a\nb"],
        2,
        "control character",
    );
    env.fails(
        &["restore", "nope:latest", s(&env.path("o.img"))],
        2,
        "unknown snapshot 'nope:latest'",
    );
    assert!(dir_contents(&env.store()) == before, "nothing changed");
    assert_eq!(env.list().as_array().map(Vec::len), Some(2));
}

/// Stores written before names (the golden fixtures, formats 1–3) list every snapshot under the
/// one implicit name, and still verify, restore (also as `default:latest`) and take a policy.
#[test]
fn stores_written_before_names_have_one_implicit_name() {
    for fixture in ["store-v1", "store-v2", "store-v3"] {
        let env = Env::new();
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(fixture);
        std::fs::create_dir_all(env.store()).expect("mkdir");
        for e in std::fs::read_dir(&from).expect("fixture") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), env.store().join(e.file_name())).expect("copy");
        }
        let rows = env.list();
        let rows = rows.as_array().expect("array");
        assert!(!rows.is_empty(), "{fixture}");
        assert!(
            rows.iter().all(|r| r["name"] == "default"),
            "{fixture}: {rows:?}"
        );
        assert!(env.ok(&["verify"]).contains("clean"), "{fixture}");
        let newest = rows
            .iter()
            .filter_map(|r| r["id"].as_u64())
            .max()
            .expect("id");
        let (x, y) = (env.path("x.img"), env.path("y.img"));
        env.ok(&["restore", &newest.to_string(), s(&x)]);
        env.ok(&["restore", "default:latest", s(&y)]);
        assert!(
            std::fs::read(&x).expect("x") == std::fs::read(&y).expect("y"),
            "{fixture}"
        );
        let plan: serde_json::Value = serde_json::from_str(&env.ok(&[
            "forget",
            "--name",
            "default",
            "--keep-last",
            "1",
            "--dry-run",
            "--json",
        ]))
        .expect("json");
        assert_eq!(
            plan["removed"].as_array().map(Vec::len),
            Some(rows.len() - 1),
            "{fixture}"
        );
    }
}

/// A snapshot written with `label` under image name `name` through the engine, as a pagesnap from
/// before labels were checked could (labels holding ':').
fn legacy_labelled(env: &Env, image: &Path, name: &str, label: &str) -> u64 {
    let (mut store, _) = pagesnap_store::Store::open(env.store(), pagesnap_store::Mode::Write)
        .expect("open the store");
    let options = pagesnap_engine::image::SnapshotOptions {
        name: Some(name.into()),
        ..Default::default()
    };
    pagesnap_engine::image::snapshot_image_with(
        &mut store,
        image,
        Some(label.into()),
        &|_| {},
        options,
    )
    .expect("snapshot")
    .id
    .0
}

/// A label holding ':' could shadow `NAME:latest` of another image: new ones (and `latest`) are
/// refused, and one written before is refused as ambiguous where it meets a `NAME:` form.
#[test]
fn a_label_cannot_shadow_name_latest() {
    let env = Env::new();
    let (a, b, out) = (env.path("a.img"), env.path("b.img"), env.path("out.img"));
    env.ok(&["init"]);
    std::fs::write(&a, vec![0xaa; 8192]).expect("write");
    std::fs::write(&b, vec![0xbb; 8192]).expect("write");
    env.ok(&["snapshot", s(&a), "--name", "prod"]);
    let before = dir_contents(&env.store());
    env.fails(
        &[
            "snapshot",
            s(&b),
            "--name",
            "test",
            "--label",
            "prod:latest",
        ],
        2,
        "holds ':'",
    );
    env.fails(
        &["snapshot", s(&b), "--name", "test", "--label", "latest"],
        2,
        "'latest' is reserved",
    );
    assert!(dir_contents(&env.store()) == before, "nothing written");
    env.ok(&["restore", "prod:latest", s(&out), "--force"]);
    assert_eq!(std::fs::read(&out).expect("read"), vec![0xaa; 8192]);
    // A label from before the rule: the argument is ambiguous, and says how to pick.
    let legacy = legacy_labelled(&env, &b, "test", "prod:latest");
    assert_eq!(legacy, 2);
    let err = env.fails(
        &["restore", "prod:latest", s(&out), "--force"],
        2,
        "ambiguous snapshot 'prod:latest'",
    );
    assert!(
        err.contains("snapshot 1") && err.contains("snapshot 2") && err.contains("id"),
        "{err}"
    );
    env.ok(&["restore", "2", s(&out), "--force"]);
    assert_eq!(std::fs::read(&out).expect("read"), vec![0xbb; 8192]);
}

/// With names `a` and `a:b`, `a:b:x` is name `a` with label `b:x` when `a:b` has no label `x`;
/// when both resolve to different snapshots the argument is ambiguous.
#[test]
fn every_name_label_split_is_tried() {
    let env = Env::new();
    let (a, b, out) = (env.path("a.img"), env.path("b.img"), env.path("out.img"));
    env.ok(&["init"]);
    std::fs::write(&a, vec![0xaa; 8192]).expect("write");
    std::fs::write(&b, vec![0xbb; 8192]).expect("write");
    assert_eq!(legacy_labelled(&env, &a, "a", "b:x"), 1);
    env.ok(&["snapshot", s(&b), "--name", "a:b"]);
    env.ok(&["restore", "a:b:x", s(&out), "--force"]);
    assert_eq!(std::fs::read(&out).expect("read"), vec![0xaa; 8192]);
    env.ok(&["restore", "a:b:latest", s(&out), "--force"]);
    assert_eq!(std::fs::read(&out).expect("read"), vec![0xbb; 8192]);
    env.ok(&["snapshot", s(&b), "--name", "a:b", "--label", "x"]);
    env.fails(
        &["restore", "a:b:x", s(&out), "--force"],
        2,
        "ambiguous snapshot 'a:b:x'",
    );
    env.fails(
        &["restore", "a:b:y", s(&out), "--force"],
        2,
        "no snapshot of image name 'a:b' has the label 'y'",
    );
}

/// An image whose canonical path is no valid name (a control character) is still snapshotted
/// without --name, under `path-<hash>`, and its next snapshot continues from it.
#[test]
fn a_path_that_is_no_valid_name_still_snapshots() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("a\tb.img");
    std::fs::write(&img, image(8, 1)).expect("write");
    let first = env.snapshot(&img);
    let second = env.snapshot(&img);
    let list = env.list();
    let name = list[0]["name"].as_str().expect("name").to_string();
    assert!(name.starts_with("path-") && name.len() == 21, "{list}");
    assert_eq!(list[1]["name"].as_str(), Some(name.as_str()));
    assert_eq!(list[1]["parent"].as_u64(), Some(first), "{list}");
    assert_eq!(second, 2);
    env.ok(&[
        "restore",
        &format!("{name}:latest"),
        s(&env.path("out.img")),
    ]);
}

/// Text-like pages (zstd and lz4 shrink them), a third of them zero.
fn text_image(pages: usize, seed: u64) -> Vec<u8> {
    let words = [
        "page ",
        "snapshot ",
        "store ",
        "frame ",
        "zstd ",
        "restore ",
        "kernel ",
        "the ",
    ];
    let mut data = vec![0u8; pages * 4096];
    let mut x = seed | 1;
    for p in (0..pages).filter(|p| p % 3 != 0) {
        let mut at = p * 4096;
        while at < (p + 1) * 4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = words[(x % words.len() as u64) as usize].as_bytes();
            let n = w.len().min((p + 1) * 4096 - at);
            data[at..at + n].copy_from_slice(&w[..n]);
            at += n;
        }
    }
    data
}

#[test]
fn compression_is_chosen_at_init_changed_later_and_every_snapshot_restores_exactly() {
    let env = Env::new();
    // Bad settings are refused before anything is created.
    for (bad, words) in [
        ("gzip", "auto, none, lz4, zstd"),
        ("zstd:42", "LEVEL -7..=19"),
    ] {
        let (code, _, err) = env.run(&["init", "--compression", bad]);
        assert!(code == 2 && err.contains(words), "{bad}: {code} {err}");
    }
    assert!(!env.store().join("superblock").exists());
    let out = env.ok(&["init", "--compression", "lz4"]);
    assert!(out.contains("compression lz4"), "{out}");
    assert_eq!(env.ok(&["compression"]).trim(), "lz4");
    let img = env.path("disk.img");
    let v1 = text_image(600, 1);
    std::fs::write(&img, &v1).expect("write");
    let first = env.snapshot(&img);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["info", "--json"])).expect("json");
    assert_eq!(info["compression"], "lz4");
    assert_eq!(info["stored_bytes"], 400 * 4096, "distinct non-zero pages");
    let compressed = info["compressed_bytes"].as_u64().expect("compressed");
    assert!(
        compressed * 2 < 400 * 4096,
        "lz4 halves text pages at least: {compressed}"
    );
    // Changed for new pages only; a bad setting changes nothing.
    let (code, _, err) = env.run(&["compression", "zstd:99"]);
    assert!(code == 2 && err.contains("LEVEL"), "{code} {err}");
    assert_eq!(env.ok(&["compression"]).trim(), "lz4");
    env.ok(&["compression", "zstd:3"]);
    assert_eq!(env.ok(&["compression"]).trim(), "zstd:3");
    let mut v2 = v1.clone();
    v2[..200 * 4096].copy_from_slice(&text_image(200, 7)[..]);
    std::fs::write(&img, &v2).expect("write");
    let second = env.snapshot(&img);
    env.ok(&["compression", "none"]);
    let mut v3 = v2.clone();
    v3[300 * 4096..301 * 4096].fill(0xa5);
    std::fs::write(&img, &v3).expect("write");
    let third = env.snapshot(&img);
    let list = env.list();
    let rows = list.as_array().expect("array");
    assert_eq!(rows.len(), 3);
    for r in rows {
        for k in [
            "stored_bytes",
            "new_bytes",
            "compressed_bytes",
            "bytes_added",
        ] {
            assert!(r[k].is_u64(), "{k} in {r}");
        }
    }
    // The third snapshot's one new page is stored plain (compression none): as large as it is.
    assert_eq!(rows[2]["new_bytes"], 4096);
    assert_eq!(rows[2]["compressed_bytes"], 4096);
    let table = env.ok(&["list"]);
    assert!(table.contains("STORED") && table.contains("NEW") && table.contains("ADDED"));
    assert!(env.ok(&["verify"]).contains("clean"));
    for (id, want) in [(first, &v1), (second, &v2), (third, &v3)] {
        let out = env.path(&format!("r{id}.img"));
        env.ok(&["restore", &id.to_string(), s(&out)]);
        assert!(std::fs::read(&out).expect("read") == *want, "snapshot {id}");
    }
    // gc after deleting the first rewrites what lives on in its frames; all still restores.
    env.ok(&["delete", &first.to_string()]);
    env.ok(&["gc"]);
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["info", "--json"])).expect("json");
    assert_eq!(info["reclaimable_bytes"], 0);
    for (id, want) in [(second, &v2), (third, &v3)] {
        let out = env.path(&format!("g{id}.img"));
        env.ok(&["restore", &id.to_string(), s(&out)]);
        assert!(
            std::fs::read(&out).expect("read") == *want,
            "snapshot {id} after gc"
        );
    }
}

#[test]
fn a_format_3_store_needs_upgrade_before_compression() {
    let env = Env::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/store-v3");
    std::fs::create_dir_all(env.store()).expect("mkdir");
    for e in std::fs::read_dir(&fixture).expect("fixture") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), env.store().join(e.file_name())).expect("copy");
    }
    assert_eq!(env.ok(&["compression"]).trim(), "none");
    env.fails(&["compression", "auto"], 2, "pagesnap upgrade");
    let out = env.ok(&["upgrade"]);
    assert!(out.contains("from format 3 to format 4"), "{out}");
    env.ok(&["compression", "auto"]);
    assert!(env.ok(&["compression"]).contains("zstd level 1"));
    assert!(env.ok(&["verify"]).contains("clean"));
}
