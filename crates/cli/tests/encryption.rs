//! `pagesnap` on an encrypted store (issue 17), through the real binary: no plaintext of the image
//! anywhere in the store, passwords from every source, wrong or missing ones refused with exit 2
//! and nothing changed, and each kind of sealed record tampered: `verify` exits 1 and `restore`
//! writes no wrong bytes.

use assert_cmd::Command;
use std::path::{Path, PathBuf};

const MARKER: &[u8] = b"PAGESNAP-SECRET-MARKER-7c1f";

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
    /// The binary, with no password source but those the test sets.
    fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("pagesnap").expect("binary");
        c.arg("--store")
            .arg(self.store())
            .arg("--quiet")
            .env_remove("PAGESNAP_STORE")
            .env_remove("PAGESNAP_PASSWORD")
            .env_remove("PAGESNAP_PASSWORD_FILE")
            .env_remove("PAGESNAP_NEW_PASSWORD")
            .env_remove("PAGESNAP_NEW_PASSWORD_FILE")
            .env("PAGESNAP_TEST_KDF", "fast");
        c
    }
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let mut c = self.cmd();
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.args(args).output().expect("run");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let (code, out, err) = self.run(args, env);
        assert_eq!(code, 0, "pagesnap {args:?} failed: {err}");
        out
    }
    fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(self.store())
            .expect("store dir")
            .map(|e| e.expect("entry").path())
            // The lock file names its last holder's pid: not the store's state.
            .filter(|p| p.is_file() && !p.ends_with("lock"))
            .map(|p| {
                (
                    p.file_name().expect("name").to_string_lossy().into_owned(),
                    std::fs::read(&p).expect("read"),
                )
            })
            .collect();
        v.sort();
        v
    }
}

const PW: (&str, &str) = ("PAGESNAP_PASSWORD", "correct horse");

/// A 4 MiB image: text pages (compressible), random pages, zero pages; the marker in most.
fn image(path: &Path) -> Vec<u8> {
    let mut data = vec![0u8; 4 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    for (i, page) in data.chunks_mut(4096).enumerate() {
        match i % 4 {
            0 => {
                for (k, b) in page.iter_mut().enumerate() {
                    *b = b"a disk image holding mail, keys and databases. "[k % 47];
                }
            }
            1 => {
                for b in page.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            2 => continue,
            _ => page[..64].fill(b'z'),
        }
        page[2000..2000 + MARKER.len()].copy_from_slice(MARKER);
    }
    std::fs::write(path, &data).expect("image");
    data
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn init(env: &Env) {
    let out = env.ok(
        &["init", "--encrypt"],
        &[("PAGESNAP_NEW_PASSWORD", "correct horse")],
    );
    assert!(out.contains("encrypted"), "{out}");
    assert!(!out.contains("correct horse"));
}

#[test]
fn no_plaintext_of_the_image_anywhere_in_the_store_and_it_restores() {
    let env = Env::new();
    init(&env);
    let img = env.path("disk.img");
    let data = image(&img);
    let out = env.ok(
        &[
            "snapshot",
            img.to_str().expect("utf-8"),
            "--label",
            "first",
            "--json",
        ],
        &[PW],
    );
    assert!(!out.contains("correct horse"), "{out}");
    // A second snapshot after a change, so deltas and more commit records exist too.
    let mut changed = data.clone();
    changed[8192 + 5..8192 + 5 + MARKER.len()].copy_from_slice(MARKER);
    std::fs::write(&img, &changed).expect("change");
    env.ok(
        &[
            "snapshot",
            img.to_str().expect("utf-8"),
            "--label",
            "second",
        ],
        &[PW],
    );
    let files = env.files();
    assert!(files.iter().any(|(n, _)| n == "superblock"));
    assert!(files.iter().any(|(n, _)| n == "keys"));
    for (name, bytes) in &files {
        assert!(!contains(bytes, MARKER), "the image's marker in {name}");
        assert!(!contains(bytes, b"mail, keys and"), "image text in {name}");
        assert!(!contains(bytes, b"second"), "a label in {name}");
        assert!(!contains(bytes, b"disk.img"), "the image's name in {name}");
    }
    for (label, want) in [("first", &data), ("second", &changed)] {
        let out = env.path(&format!("{label}.img"));
        env.ok(&["restore", label, out.to_str().expect("utf-8")], &[PW]);
        assert!(std::fs::read(&out).expect("restored") == *want, "{label}");
    }
    let v = env.ok(&["verify"], &[PW]);
    assert!(v.contains("clean"), "{v}");
    // New stores seal with AES-256-GCM-SIV (scheme 2); info says so.
    let info = env.ok(&["info", "--json"], &[PW]);
    assert!(info.contains(r#""encryption":"AES-256-GCM-SIV""#), "{info}");
    let info = env.ok(&["info"], &[PW]);
    assert!(info.contains("AES-256-GCM-SIV (scheme 2)"), "{info}");
}

#[test]
fn passwords_from_every_source_and_wrong_or_missing_ones_are_refused() {
    let env = Env::new();
    init(&env);
    let img = env.path("disk.img");
    image(&img);
    env.ok(&["snapshot", img.to_str().expect("utf-8")], &[PW]);
    let before = env.files();
    // Missing (no terminal under the test harness): exit 2, saying where a password comes from.
    for args in [
        &["list"][..],
        &["snapshot", img.to_str().expect("utf-8")],
        &["verify"],
    ] {
        let (code, _, err) = env.run(args, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("PAGESNAP_PASSWORD"), "{err}");
    }
    // Wrong: exit 2, "wrong password", nothing changed (a writer's open included).
    for args in [
        &["list"][..],
        &["snapshot", img.to_str().expect("utf-8")],
        &["gc"],
    ] {
        let (code, _, err) = env.run(args, &[("PAGESNAP_PASSWORD", "wrong")]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("wrong password"), "{err}");
        assert!(!err.contains("correct horse"));
    }
    assert!(env.files() == before, "refused commands changed the store");
    // From a file: the option, then the variable naming a file.
    let pwfile = env.path("pw");
    std::fs::write(&pwfile, "correct horse\n").expect("pw file");
    let p = pwfile.to_str().expect("utf-8");
    env.ok(&["--password-file", p, "list"], &[]);
    env.ok(&["list"], &[("PAGESNAP_PASSWORD_FILE", p)]);
    // An added password opens it; the slot in use cannot remove itself; the other can.
    env.ok(
        &["key", "add", "--label", "second"],
        &[PW, ("PAGESNAP_NEW_PASSWORD", "battery staple")],
    );
    let second = [("PAGESNAP_PASSWORD", "battery staple")];
    let list = env.ok(&["key", "list", "--json"], &second);
    assert!(
        list.contains("\"second\"") && !list.contains("battery"),
        "{list}"
    );
    let (code, _, err) = env.run(&["key", "remove", "2"], &second);
    assert_eq!(code, 2, "{err}");
    env.ok(&["key", "remove", "1"], &second);
    let (code, _, err) = env.run(&["list"], &[PW]);
    assert_eq!((code, err.contains("wrong password")), (2, true), "{err}");
    // passwd: the old password stops working, the new one works.
    env.ok(
        &["key", "passwd"],
        &[second[0], ("PAGESNAP_NEW_PASSWORD", "third one")],
    );
    assert_eq!(env.run(&["list"], &second).0, 2);
    env.ok(&["list"], &[("PAGESNAP_PASSWORD", "third one")]);
    // A plaintext store asks for no password and gets no key file.
    let plain = Env::new();
    plain.ok(&["init"], &[]);
    plain.ok(&["list"], &[]);
    assert!(!plain.store().join("keys").exists());
    let (code, _, err) = plain.run(&["key", "list"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not encrypted"), "{err}");
}

/// Record (file, offset, kind, whole length) of the store's segments, by their clear headers.
fn records(store: &Path) -> Vec<(PathBuf, usize, u8, usize)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(store)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
        })
        .collect();
    names.sort();
    for path in names {
        let b = std::fs::read(&path).expect("seg");
        let mut at = 64;
        while at + 60 <= b.len() && &b[at..at + 4] == b"PREC" {
            let plen = u32::from_le_bytes(b[at + 8..at + 12].try_into().expect("4")) as usize;
            let len = (56 + plen + 4).next_multiple_of(8);
            out.push((path.clone(), at, b[at + 4], len));
            at += len;
        }
    }
    out
}

#[test]
fn a_tampered_record_of_each_kind_fails_verify_and_restores_no_wrong_bytes() {
    for kind in [8u8, 6, 5] {
        let env = Env::new();
        init(&env);
        let img = env.path("disk.img");
        let data = image(&img);
        env.ok(&["snapshot", img.to_str().expect("utf-8")], &[PW]);
        let recs = records(&env.store());
        let (path, at, _, _) = recs
            .iter()
            .find(|r| r.2 == kind)
            .cloned()
            .expect("a record of the kind");
        // An attacker's edit: a ciphertext byte changed and the crc32 fixed up.
        let mut b = std::fs::read(&path).expect("seg");
        b[at + 56 + 40] ^= 1;
        let plen = u32::from_le_bytes(b[at + 8..at + 12].try_into().expect("4")) as usize;
        let crc = crc32fast::hash(&b[at..at + 56 + plen]);
        b[at + 56 + plen..at + 60 + plen].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &b).expect("tamper");
        let (code, out, err) = env.run(&["verify"], &[PW]);
        // (A commit record with one copy left still opens; verify reports the damaged copy.)
        assert_eq!(code, 1, "kind {kind}: verify exit {code}: {out}{err}");
        let restored = env.path("out.img");
        let (code, _, err) = env.run(&["restore", "1", restored.to_str().expect("utf-8")], &[PW]);
        if code == 0 {
            assert!(
                std::fs::read(&restored).expect("restored") == data,
                "kind {kind}: wrong bytes restored"
            );
        } else {
            assert_eq!(code, 2, "kind {kind}: {err}");
        }
    }
}
