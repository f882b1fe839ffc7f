//! `pagesnap --store s3://…` against a real S3-compatible server started here: moto's
//! (`moto_server`, from PyPI's `moto[server]`; `.ci/run` installs it into a virtualenv and sets
//! `PAGESNAP_MOTO_SERVER`). Without it, each test says so and passes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn moto_server() -> Option<PathBuf> {
    let from_env = std::env::var_os("PAGESNAP_MOTO_SERVER").map(PathBuf::from);
    let found = from_env.filter(|p| p.exists()).or_else(|| {
        let out = Command::new("sh")
            .arg("-c")
            .arg("command -v moto_server")
            .output()
            .ok()?;
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!p.is_empty()).then(|| PathBuf::from(p))
    });
    if found.is_none() {
        println!(
            "skipped: moto_server is not installed (pip install 'moto[server]', or set PAGESNAP_MOTO_SERVER)"
        );
    }
    found
}

/// A moto server on a free port of 127.0.0.1, with one bucket; stopped on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(bin: &Path) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if moto.http("PUT", "/pagesnap-test").is_some_and(|s| s == 200) {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One plain HTTP request (moto checks no signatures); the status code.
    fn http(&self, method: &str, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        resp.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    dir: tempfile::TempDir,
    moto: Moto,
}

impl Env {
    fn new() -> Option<Env> {
        let bin = moto_server()?;
        Some(Env {
            dir: tempfile::tempdir().expect("tmp"),
            moto: Moto::start(&bin),
        })
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// `pagesnap` on a store, as a machine with its own cache (`cache`) would run it.
    fn cmd_on(&self, store: &str, cache: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pagesnap"));
        c.arg("--store")
            .arg(store)
            .arg("--quiet")
            .env_remove("PAGESNAP_STORE")
            .env_remove("PAGESNAP_PASSWORD")
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.moto.port),
            )
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .env("PAGESNAP_CACHE_DIR", self.path(cache));
        c
    }
    fn cmd(&self) -> Command {
        self.cmd_on("s3://pagesnap-test/vm", "cache")
    }
    fn run_on(&self, store: &str, cache: &str, args: &[&str]) -> (i32, String, String) {
        let out = self
            .cmd_on(store, cache)
            .args(args)
            .output()
            .expect("run pagesnap");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    fn run_on_env(
        &self,
        store: &str,
        vars: &[(&str, &str)],
        args: &[&str],
    ) -> (i32, String, String) {
        let mut c = self.cmd_on(store, "cache");
        for (k, v) in vars {
            c.env(k, v);
        }
        let out = c
            .env("PAGESNAP_TEST_KDF", "fast")
            .args(args)
            .output()
            .expect("run pagesnap");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    fn ok_on(&self, store: &str, args: &[&str]) -> String {
        let (code, out, err) = self.run_on(store, "cache", args);
        assert_eq!(code, 0, "pagesnap {args:?} failed:\n{out}\n{err}");
        out
    }
    fn ok(&self, args: &[&str]) -> String {
        self.ok_on("s3://pagesnap-test/vm", args)
    }
    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(self.ok(args).trim()).expect("json")
    }
}

/// Bytes that compress about as a file system does: random words in runs, zero pages between.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed | 1;
    for (i, chunk) in v.chunks_mut(4096).enumerate() {
        if i % 5 == 4 {
            continue;
        }
        for c in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = if i % 3 == 0 { x } else { x & 0x0F0F_0F0F };
            c.copy_from_slice(&w.to_le_bytes()[..c.len()]);
        }
    }
    v
}

/// Incompressible bytes.
fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn change(path: &Path, pages: &[usize], seed: u8) {
    let mut img = std::fs::read(path).expect("read image");
    for p in pages {
        for (i, b) in img[p * 4096..(p + 1) * 4096].iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8).wrapping_mul(31) ^ (*p as u8);
        }
        img[p * 4096..p * 4096 + 8].copy_from_slice(&(*p as u64).to_le_bytes());
    }
    std::fs::write(path, img).expect("write image");
}

#[test]
fn snapshot_list_diff_verify_restore_on_s3() {
    let Some(env) = Env::new() else { return };
    let img = env.path("disk.img");
    std::fs::write(&img, image(24 * MIB, 7)).expect("image");
    env.ok(&["init"]);
    let first = env.json(&[
        "snapshot",
        img.to_str().expect("utf-8"),
        "--json",
        "--label",
        "one",
    ]);
    let v1 = std::fs::read(&img).expect("read");
    // About 1% of the pages change.
    let changed: Vec<usize> = (0..60).map(|i| i * 97 % 6144).collect();
    change(&img, &changed, 3);
    let second = env.json(&[
        "snapshot",
        img.to_str().expect("utf-8"),
        "--json",
        "--label",
        "two",
    ]);
    let local = second["bytes_written"].as_u64().expect("bytes");
    let up = second["transfer"]["bytes_uploaded"]
        .as_u64()
        .expect("uploaded");
    println!("first {first}\nsecond {second}");
    assert_eq!(second["pages_changed"], 60);
    // The incremental uploads what it wrote, plus the head object (superblock and piece map).
    assert!(
        up <= local + 64 * 1024,
        "incremental uploaded {up} bytes for {local} written"
    );
    let list = env.ok(&["list"]);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    let diff = env.ok(&["diff", "one", "two"]);
    assert!(diff.contains("60 page(s) differ"), "{diff}");
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("clean"), "{verify}");
    for (label, want) in [("one", v1), ("two", std::fs::read(&img).expect("read"))] {
        let out = env.path(&format!("{label}.img"));
        env.ok(&["restore", label, out.to_str().expect("utf-8")]);
        assert!(
            std::fs::read(&out).expect("restored") == want,
            "{label} differs"
        );
    }
    // A second machine (no cache) sees the same store.
    let (code, out, err) = env.run_on("s3://pagesnap-test/vm", "cache2", &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(2));
    // A store that is not there, and a bucket that is not there: clear errors, exit 1.
    let (code, _, err) = env.run_on("s3://pagesnap-test/nothing", "cache", &["list"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a pagesnap store"), "{err}");
    let (code, _, err) = env.run_on("s3://no-such-bucket/x", "cache", &["init"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no-such-bucket") || err.contains("NoSuchBucket"),
        "{err}"
    );
}

/// `kill -9` of a snapshot at several moments of its upload: every snapshot listed before is
/// still listed and restores byte for byte, the next snapshot succeeds, and gc deletes what the
/// killed uploads left.
#[test]
fn kill_during_upload_loses_nothing_committed() {
    let Some(env) = Env::new() else { return };
    let img = env.path("disk.img");
    std::fs::write(&img, image(16 * MIB, 1)).expect("image");
    env.ok(&["init", "--compression", "none"]);
    env.ok(&["snapshot", img.to_str().expect("utf-8"), "--label", "base"]);
    let base = std::fs::read(&img).expect("read");
    // A big, incompressible change: several pieces to upload.
    let big = env.path("big.img");
    let mut data = random(16 * MIB, 99);
    data.extend(image(48 * MIB, 5));
    std::fs::write(&big, &data).expect("big image");
    let mut killed = 0;
    for delay_ms in [5u64, 40, 120, 250, 400] {
        let mut child = env
            .cmd()
            .args([
                "snapshot",
                big.to_str().expect("utf-8"),
                "--label",
                "killed",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().expect("wait").is_none() {
            killed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        let list = env.ok(&["list"]);
        assert!(
            list.contains("base"),
            "after a kill at {delay_ms} ms: {list}"
        );
        let out = env.path("base.img");
        let _ = std::fs::remove_file(&out);
        env.ok(&["restore", "base", out.to_str().expect("utf-8")]);
        assert!(std::fs::read(&out).expect("restored") == base);
    }
    println!("{killed} of 5 snapshots were killed while running");
    // The next snapshot succeeds and restores.
    env.ok(&["snapshot", big.to_str().expect("utf-8"), "--label", "after"]);
    let out = env.path("after.img");
    env.ok(&["restore", "after", out.to_str().expect("utf-8")]);
    assert!(std::fs::read(&out).expect("restored") == data);
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("clean"), "{verify}");
    // gc deletes what no commit names; a second gc finds nothing more.
    let gc = env.ok(&["gc"]);
    println!("{gc}");
    let again = env.ok(&["gc"]);
    assert!(!again.contains("object(s) that no commit names"), "{again}");
}

/// Two machines write at once: the one that opened last commits; the other's commit fails with
/// a clear error and changes nothing.
#[test]
fn a_second_writer_racing_the_commit_loses_cleanly() {
    let Some(env) = Env::new() else { return };
    let small = env.path("small.img");
    std::fs::write(&small, image(MIB, 3)).expect("image");
    let big = env.path("big.img");
    std::fs::write(&big, random(160 * MIB, 5)).expect("big image");
    env.ok(&["init", "--compression", "none"]);
    env.ok(&[
        "snapshot",
        small.to_str().expect("utf-8"),
        "--label",
        "first",
    ]);
    let generation = |env: &Env| -> u64 {
        let (code, out, err) = env.run_on("s3://pagesnap-test/vm", "cache-r", &["info", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        v["generation"].as_u64().expect("generation")
    };
    let before = generation(&env);
    // Machine A starts a long snapshot; once its open has moved the head, machine B (another
    // cache, so no shared lock file) takes a short one.
    let a = env
        .cmd_on("s3://pagesnap-test/vm", "cache-a")
        .args([
            "snapshot",
            big.to_str().expect("utf-8"),
            "--label",
            "from-a",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a");
    let deadline = Instant::now() + Duration::from_secs(30);
    while generation(&env) == before {
        assert!(
            Instant::now() < deadline,
            "machine A never opened the store"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, out, err) = env.run_on(
        "s3://pagesnap-test/vm",
        "cache-b",
        &[
            "snapshot",
            small.to_str().expect("utf-8"),
            "--label",
            "from-b",
        ],
    );
    assert_eq!(code, 0, "machine B: {out}\n{err}");
    let a = a.wait_with_output().expect("wait a");
    let a_err = String::from_utf8_lossy(&a.stderr);
    if a.status.success() {
        // A finished before B opened: then both are there, one after the other.
        println!("machine A committed before B opened; no race this time");
        let list = env.ok(&["list"]);
        assert!(list.contains("from-a") && list.contains("from-b"), "{list}");
        return;
    }
    assert!(a_err.contains("another writer"), "unclear error: {a_err}");
    let list = env.ok(&["list"]);
    assert!(list.contains("first") && list.contains("from-b"), "{list}");
    assert!(!list.contains("from-a"), "{list}");
    let verify = env.ok(&["verify"]);
    assert!(verify.contains("clean"), "{verify}");
}

/// `pagesnap copy` local -> S3 -> local: byte-identical restores; copying again sends nothing;
/// an incremental copy sends the changed pages only.
#[test]
fn copy_between_a_directory_and_s3() {
    let Some(env) = Env::new() else { return };
    let img = env.path("disk.img");
    std::fs::write(&img, image(8 * MIB, 11)).expect("image");
    let local = env.path("local");
    let local = local.to_str().expect("utf-8");
    env.ok_on(local, &["init"]);
    env.ok_on(
        local,
        &["snapshot", img.to_str().expect("utf-8"), "--label", "a"],
    );
    let va = std::fs::read(&img).expect("read");
    change(&img, &[3, 400, 1500], 9);
    env.ok_on(
        local,
        &["snapshot", img.to_str().expect("utf-8"), "--label", "b"],
    );
    let vb = std::fs::read(&img).expect("read");
    let s3 = "s3://pagesnap-test/copy";
    let out = env.ok_on(local, &["copy", "--from", local, "--to", s3, "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let rows = v["snapshots"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["pages_sent"], 3, "{v}");
    // Again: nothing to send.
    let out = env.ok_on(local, &["copy", "--from", local, "--to", s3, "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert!(
        v["snapshots"]
            .as_array()
            .expect("rows")
            .iter()
            .all(|r| r["copied"] == false),
        "{v}"
    );
    // Into an encrypted store on S3: its password from --to-password-file alone.
    let pw = env.path("pw");
    std::fs::write(&pw, "copy secret").expect("pw");
    let enc = "s3://pagesnap-test/enc";
    let (code, _, err) = env.run_on_env(
        enc,
        &[("PAGESNAP_NEW_PASSWORD", "copy secret")],
        &["init", "--encrypt"],
    );
    assert_eq!(code, 0, "{err}");
    let pw_arg = pw.to_str().expect("utf-8");
    env.ok_on(
        local,
        &[
            "copy",
            "--from",
            local,
            "--to",
            enc,
            "--to-password-file",
            pw_arg,
        ],
    );
    let out = env.path("enc.img");
    env.ok_on(
        enc,
        &[
            "--password-file",
            pw_arg,
            "restore",
            "b",
            out.to_str().expect("utf-8"),
        ],
    );
    assert!(std::fs::read(&out).expect("restored") == vb);
    // An encrypted store is not copied into one in clear.
    let (code, _, err) = env.run_on(
        local,
        "cache",
        &[
            "copy",
            "--from",
            enc,
            "--to",
            "s3://pagesnap-test/clear",
            "--from-password-file",
            pw_arg,
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("in clear"), "{err}");
    // Back to another directory, and restore from all three.
    let back = env.path("back");
    let back = back.to_str().expect("utf-8");
    env.ok_on(local, &["copy", "--from", s3, "--to", back]);
    for store in [local, s3, back] {
        for (label, want) in [("a", &va), ("b", &vb)] {
            let out = env.path("out.img");
            let _ = std::fs::remove_file(&out);
            env.ok_on(store, &["restore", label, out.to_str().expect("utf-8")]);
            assert!(
                std::fs::read(&out).expect("restored") == *want,
                "{store} {label} differs"
            );
        }
    }
}
