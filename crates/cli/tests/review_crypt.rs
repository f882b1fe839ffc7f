//! Review of encryption at rest (f36951d), through the binary: failing tests for what the review
//! found.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &[u8] = b"REVIEW-CRYPT-SECRET-MARKER";
/// The image's file name: an origin string the threat model says is sealed.
const IMAGE_NAME: &str = "REVIEW-ORIGIN-payroll-db.img";
const PW: (&str, &str) = ("PAGESNAP_PASSWORD", "correct horse");

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
    fn image(&self) -> PathBuf {
        self.dir.path().join(IMAGE_NAME)
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pagesnap"));
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
    fn init(&self) {
        self.ok(
            &["init", "--encrypt"],
            &[("PAGESNAP_NEW_PASSWORD", "correct horse")],
        );
    }
    /// A 1 MiB image of text pages holding the marker.
    fn write_image(&self) {
        let mut data = vec![0u8; 1 << 20];
        for (i, p) in data.chunks_mut(4096).enumerate() {
            let line = format!("page {i} of a database file ");
            p[..line.len()].copy_from_slice(line.as_bytes());
            p[200..200 + MARKER.len()].copy_from_slice(MARKER);
        }
        std::fs::write(self.image(), data).expect("image");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` (recursively) holding `needle`.
fn files_with(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.is_file() && contains(&std::fs::read(&p).expect("read"), needle) {
                out.push(p);
            }
        }
    }
    out
}

/// A running `pagesnap serve`; killed if still running when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pagesnap serve` of an image in an encrypted store, stopped cleanly with SIGTERM: the tracking
/// state it leaves in the store directory (`served/<hash>.state`) holds the image's canonical
/// path — the origin string that docs/security.md says an attacker with read access cannot learn
/// ("a snapshot's label, image name, origin … are in the sealed commit records") — in clear,
/// along with the image's size, the base snapshot id and the ranges of pages changed since. Its
/// file name is an unkeyed blake3 of the path, so a guessed path can be confirmed too.
#[test]
fn serve_leaves_no_origin_in_clear_in_an_encrypted_store() {
    let env = Env::new();
    env.init();
    env.write_image();
    env.ok(&["snapshot", s(&env.image())], &[PW]);
    let sock = env.dir.path().join("s.sock");
    let child = env
        .cmd()
        .env(PW.0, PW.1)
        .arg("serve")
        .arg(env.image())
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut served = Served(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        if let Ok(Some(st)) = served.0.try_wait() {
            let mut err = String::new();
            if let Some(e) = served.0.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("serve exited ({st}) before listening: {err}");
        }
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(served.0.id().to_string())
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = served.0.wait().expect("wait");
    assert!(status.success(), "serve after SIGTERM: {status}");

    assert!(
        files_with(&env.store(), MARKER).is_empty(),
        "page plaintext"
    );
    let leaked = files_with(&env.store(), IMAGE_NAME.as_bytes());
    assert!(
        leaked.is_empty(),
        "the image's path (origin) is in clear in the encrypted store: {leaked:?}"
    );
}

/// An attacker with write access sets the superblock's encryption field to "none" (and fixes the
/// crc32) right after `init --encrypt`. The user, who gives the password as always, is not told:
/// `snapshot` exits 0 and writes the image into the store in clear (the CLI asks for a password
/// only when the superblock says so, and the store ignores one it does not need).
#[test]
fn a_downgraded_store_refuses_to_snapshot_in_clear_when_a_password_is_given() {
    let env = Env::new();
    env.init();
    env.write_image();
    let keys = std::fs::read(env.store().join("keys")).expect("keys");
    // Scheme 2 (AES-256-GCM-SIV), what `init --encrypt` makes.
    let mut field = vec![2u8, 0, 0, 0];
    field.extend_from_slice(&keys[24..40]);
    let path = env.store().join("superblock");
    let mut sb = std::fs::read(&path).expect("superblock");
    let mut changed = 0;
    for slot in sb.chunks_mut(4096) {
        if let Some(at) = slot.windows(20).position(|w| w == &field[..]) {
            slot[at..at + 20].fill(0);
            let crc = crc32fast::hash(&slot[..4092]);
            slot[4092..].copy_from_slice(&crc.to_le_bytes());
            changed += 1;
        }
    }
    assert_eq!(changed, 2, "the encryption field in both slots");
    std::fs::write(&path, sb).expect("write");

    let (code, _, err) = env.run(&["snapshot", s(&env.image())], &[PW]);
    let leaked = files_with(&env.store(), MARKER);
    assert!(
        code != 0 && leaked.is_empty(),
        "snapshot with a password into a store with a key file but a downgraded superblock: \
         exit {code} ({err}); plaintext in {leaked:?}"
    );
}
