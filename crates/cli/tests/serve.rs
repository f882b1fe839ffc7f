//! `pagesnap serve` against NBD clients nobody here wrote: qemu-io, qemu-img, nbdinfo, nbdcopy.
//! A test whose client is not installed says so and passes without it.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn has(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("skipped: {tool} is not installed (Debian: qemu-utils, libnbd-bin)");
    }
    found
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// A 16 MiB image of random bytes (every eighth MiB zero) and an empty store.
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tmp");
        let env = Env { dir };
        std::fs::write(env.image(), random(16 * MIB, 1)).expect("image");
        env.ok(&["init"]);
        env
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn image(&self) -> PathBuf {
        self.path("disk.img")
    }
    fn sock(&self, name: &str) -> PathBuf {
        self.path(name)
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pagesnap"));
        c.arg("--store")
            .arg(self.path("store"))
            .arg("--quiet")
            .env_remove("PAGESNAP_STORE");
        c
    }
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd().args(args).output().expect("run pagesnap");
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
    /// `snapshot IMAGE --json`.
    fn snapshot(&self) -> serde_json::Value {
        let out = self.ok(&["snapshot", s(&self.image()), "--json"]);
        serde_json::from_str(&out).expect("json")
    }
    fn restored(&self, id: u64) -> Vec<u8> {
        let out = self.path(&format!("restored-{id}.img"));
        self.ok(&["restore", &id.to_string(), s(&out), "--force"]);
        std::fs::read(out).expect("restored")
    }
    fn serve(&self, args: &[&str], sock: &Path) -> Served {
        let child = self
            .cmd()
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let mut served = Served {
            child,
            sock: sock.to_path_buf(),
        };
        served.wait_ready();
        served
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = vec![0u8; len];
    for (i, c) in v.chunks_mut(8).enumerate() {
        if (i * 8 / MIB) % 8 == 7 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// A running `pagesnap serve`; killed if still running when dropped.
struct Served {
    child: Child,
    sock: PathBuf,
}

impl Served {
    /// Waits until the server accepts connections (or fails: then its stderr is shown).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.sock).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(e) = self.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("serve exited ({status}) before listening: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "serve did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }
    /// Waits for the process to end: (exit code, stdout, stderr).
    fn wait(mut self) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "serve did not stop within 20 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(o) = self.child.stdout.as_mut() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        (status.code(), out, err)
    }
    /// SIGTERM: must exit 0.
    fn stop(self) -> String {
        self.signal("TERM");
        let (code, out, err) = self.wait();
        assert_eq!(code, Some(0), "serve after SIGTERM: {out}{err}");
        out
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client; asserts it succeeded; returns its stdout.
fn client(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

#[test]
fn qemu_clients_read_and_write_and_a_snapshot_reads_only_the_tracked_pages() {
    if !(has("qemu-io") && has("qemu-img")) {
        return;
    }
    let env = Env::new();
    let first = env.snapshot();
    assert_eq!(
        first["pages_read"], 4096,
        "the first snapshot reads the image"
    );
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image())], &sock);
    let u = uri(&sock);
    let out = client(
        "qemu-io",
        &[
            "-f",
            "raw",
            &u,
            "-c",
            "write -P 0xab 4096 8192", // pages 1, 2
            "-c",
            "write -z 65536 4096", // page 16
            "-c",
            "discard 131072 8192", // pages 32, 33
            "-c",
            "write -P 0x11 1000 10", // page 0, unaligned
            "-c",
            "write -P 0x22 16773000 1000", // the last two pages, unaligned
            "-c",
            "flush",
            "-c",
            "read -P 0xab 4096 8192",
            "-c",
            "read -P 0x11 1000 10",
            "-c",
            "read -P 0 65536 4096",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    let info = client("qemu-img", &["info", "-f", "raw", &u]);
    assert!(info.contains("virtual size: 16 MiB"), "{info}");
    client(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &u, s(&env.image())],
    );
    let copy = env.path("copy.img");
    client(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &u, s(&copy)],
    );
    assert!(std::fs::read(&copy).expect("copy") == std::fs::read(env.image()).expect("image"));
    // The snapshot is taken by the server: the 8 tracked pages, not the 4,096 of the image.
    let snap = env.snapshot();
    assert_eq!(snap["served"], true);
    assert_eq!(snap["pages_tracked"], 8, "{snap}");
    assert!(
        snap["pages_read"].as_u64().is_some_and(|r| r <= 8),
        "{snap}"
    );
    assert!(snap["full_read"].is_null());
    let id = snap["id"].as_u64().expect("id");
    assert_eq!(snap["image_size"], 16 * MIB as u64);
    let out = server.stop();
    assert!(out.contains("stopped"), "{out}");
    assert!(env.restored(id) == std::fs::read(env.image()).expect("image"));
    // The tracking state was kept: a new server starts from that snapshot with nothing tracked.
    let server = env.serve(&[s(&env.image())], &sock);
    let snap = env.snapshot();
    assert_eq!(
        (snap["pages_tracked"].as_u64(), snap["pages_read"].as_u64()),
        (Some(0), Some(0))
    );
    server.stop();
}

#[test]
fn nbdinfo_sees_the_export_and_its_holes_and_nbdcopy_copies_in_and_out() {
    if !(has("nbdinfo") && has("nbdcopy")) {
        return;
    }
    let env = Env::new();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image()), "--name", "vm"], &sock);
    let u = uri(&sock);
    let info = client("nbdinfo", &[&u]);
    for want in [
        "export=\"vm\"",
        "can_multi_conn: true",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "is_read_only: false",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "base:allocation",
    ] {
        assert!(info.contains(want), "{want} missing in {info}");
    }
    // The named export works too.
    client(
        "nbdinfo",
        &[
            "--size",
            &format!("nbd+unix:///vm?socket={}", sock.display()),
        ],
    );
    // Copy a new image in over several connections; the server keeps the file sparse where
    // nbdcopy zeroes.
    let src = env.path("src.img");
    std::fs::write(&src, random(16 * MIB, 2)).expect("src");
    client("nbdcopy", &["--request-size=1048576", s(&src), &u]);
    let map = client("nbdinfo", &["--map", &u]);
    assert!(map.contains("hole,zero"), "the zero MiB is a hole: {map}");
    assert!(map.contains("data"), "{map}");
    let back = env.path("back.img");
    client("nbdcopy", &[&u, s(&back)]);
    let want = std::fs::read(&src).expect("src");
    assert!(std::fs::read(&back).expect("back") == want);
    assert!(
        std::fs::read(env.image()).expect("image") == want,
        "the image is a plain raw file"
    );
    let snap = env.snapshot();
    assert!(
        snap["full_read"].is_string(),
        "no tracking state yet: a full read, said so"
    );
    server.stop();
    assert!(env.restored(snap["id"].as_u64().expect("id")) == want);
}

#[test]
fn a_server_killed_during_writes_restarts_and_the_next_snapshot_is_the_image() {
    if !has("qemu-io") {
        return;
    }
    let env = Env::new();
    env.snapshot();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image())], &sock);
    // Many writes; the server is killed once the first ones were acknowledged.
    let mut args = vec!["-f".to_string(), "raw".into(), uri(&sock)];
    for i in 0..400u64 {
        args.push("-c".into());
        args.push(format!(
            "write -P {} {} 4096",
            i % 250 + 1,
            (i * 7919 % 4000) * 4096
        ));
    }
    let mut writer = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let mut lines = BufReader::new(writer.stdout.take().expect("stdout")).lines();
    let mut acknowledged = 0;
    while acknowledged < 20 {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("wrote") => acknowledged += 1,
            Some(Ok(_)) => {}
            _ => panic!("qemu-io ended after {acknowledged} writes"),
        }
    }
    server.signal("KILL");
    let _ = server.wait();
    let _ = writer.wait();
    // Restart: tracking is not trusted, so the next snapshot reads everything and says so.
    let server = env.serve(&[s(&env.image())], &sock);
    let snap = env.snapshot();
    let why = snap["full_read"]
        .as_str()
        .expect("a full read after a kill");
    assert!(why.contains("did not stop cleanly"), "{why}");
    assert_eq!(snap["pages_tracked"], 4096);
    let image = std::fs::read(env.image()).expect("image");
    assert!(
        env.restored(snap["id"].as_u64().expect("id")) == image,
        "the snapshot is the image"
    );
    // From there on tracking is exact again.
    client(
        "qemu-io",
        &["-f", "raw", &uri(&sock), "-c", "write -P 9 0 4096"],
    );
    let snap = env.snapshot();
    assert_eq!(
        (snap["pages_tracked"].as_u64(), snap["full_read"].is_null()),
        (Some(1), true)
    );
    server.stop();
    assert!(
        env.restored(snap["id"].as_u64().expect("id"))
            == std::fs::read(env.image()).expect("image")
    );
}

#[test]
fn a_stored_snapshot_is_served_read_only() {
    if !has("qemu-img") {
        return;
    }
    let env = Env::new();
    let first = env.snapshot()["id"].as_u64().expect("id");
    let mut changed = std::fs::read(env.image()).expect("image");
    changed[5 * MIB..6 * MIB].fill(0);
    changed[..4096].fill(0x5A);
    std::fs::write(env.image(), &changed).expect("change");
    env.snapshot();
    let sock = env.sock("ro.sock");
    let server = env.serve(&["--snapshot", &first.to_string()], &sock);
    let u = uri(&sock);
    let original = env.path("original.img");
    std::fs::write(&original, random(16 * MIB, 1)).expect("original");
    client(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &u, s(&original)],
    );
    if has("nbdinfo") {
        let info = client("nbdinfo", &[&u]);
        assert!(info.contains("is_read_only: true"), "{info}");
        let map = client("nbdinfo", &["--map", &u]);
        // The eighth MiB is zero in the snapshot: not stored, reported as a hole.
        assert!(
            map.contains(" 7340032     1048576    3  hole,zero"),
            "{map}"
        );
    }
    if has("qemu-io") {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", &u, "-c", "write 0 4096"])
            .output()
            .expect("qemu-io");
        assert!(!out.status.success(), "a write to a read-only export fails");
    }
    server.stop();
    assert!(
        env.restored(first) == random(16 * MIB, 1),
        "the store is unchanged"
    );
}

#[test]
fn snapshot_every_takes_snapshots_by_itself() {
    if !has("qemu-io") {
        return;
    }
    let env = Env::new();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image()), "--snapshot-every", "200ms"], &sock);
    client(
        "qemu-io",
        &["-f", "raw", &uri(&sock), "-c", "write -P 7 8192 4096"],
    );
    // Wait (bounded) for a snapshot taken after the write: the image's content.
    let image = std::fs::read(env.image()).expect("image");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0;
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&env.ok(&["list", "--json"])).expect("json");
        let ids: Vec<u64> = list
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|s| s["id"].as_u64())
            .collect();
        if let Some(&last) = ids.last().filter(|&&l| l > seen) {
            seen = last;
            if env.restored(last) == image {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no periodic snapshot of the written image"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = server.stop();
    assert!(out.contains("snapshot "), "{out}");
}

#[test]
fn sigterm_with_an_idle_client_connected_exits_zero_and_bad_input_is_refused() {
    let env = Env::new();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image())], &sock);
    let idle = UnixStream::connect(&sock).expect("connect");
    // A second server of the same image is refused: the first holds its lock.
    let (code, _, err) = env.run(&["serve", s(&env.image()), "--socket", s(&env.sock("b.sock"))]);
    assert_eq!(code, 2);
    assert!(err.contains("locked by another process"), "{err}");
    server.stop();
    drop(idle);
    for (args, words) in [
        (
            vec!["serve", "missing.img", "--socket", "x.sock"],
            "missing.img",
        ),
        (
            vec!["serve", "--snapshot", "nope", "--socket", "x.sock"],
            "unknown snapshot 'nope'",
        ),
        (
            vec![
                "serve",
                s(&env.image()),
                "--snapshot-every",
                "10x",
                "--socket",
                "x.sock",
            ],
            "unknown unit",
        ),
        (
            vec!["serve", s(&env.image()), "--listen", "256.1.1.1:1"],
            "listening on 256.1.1.1:1",
        ),
        (
            vec![
                "serve",
                env.dir.path().to_str().expect("utf-8"),
                "--socket",
                "y.sock",
            ],
            "not a regular file",
        ),
    ] {
        let (code, out, err) = env.run(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(words), "{args:?}: {err:?} lacks {words:?}");
    }
}

/// Waits (bounded) until the image's last change is `age` old: sets up a snapshot whose
/// recorded identity is settled (trusted by the unchanged-image skip).
fn settle(image: &Path, age: Duration) {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = std::fs::metadata(image).expect("stat");
        let ctime = std::time::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32);
        if std::time::SystemTime::now()
            .duration_since(ctime)
            .is_ok_and(|a| a >= age)
        {
            return;
        }
        assert!(Instant::now() < deadline, "the image did not settle");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn review_after_a_killed_server_a_snapshot_without_one_reads_the_image_whole() {
    if !has("qemu-io") {
        return;
    }
    let env = Env::new();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image())], &sock);
    client(
        "qemu-io",
        &["-f", "raw", &uri(&sock), "-c", "write -P 9 0 4096"],
    );
    settle(&env.image(), Duration::from_millis(200));
    env.snapshot(); // by the server: records the image's identity, settled
    server.signal("KILL");
    let _ = server.wait();
    // Without a server: the identity matches that snapshot, but after an unclean end it cannot
    // vouch for the image (a crash may have lost timestamps while keeping flushed data).
    let (code, out, err) = env.run(&["snapshot", s(&env.image()), "--json"]);
    assert_eq!(code, 0, "{err}");
    let snap: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        snap["unchanged"], false,
        "skipped on the strength of its identity: {snap}"
    );
    assert!(snap["pages_read"].as_u64() > Some(0), "{snap}");
    assert!(err.contains("did not stop cleanly"), "{err}");
}

/// The control socket of the server of `env`'s image (there is one server per test).
fn control_socket(env: &Env) -> PathBuf {
    let dir = env.path("store").join("served");
    std::fs::read_dir(&dir)
        .expect("served dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .expect("a control socket")
}

#[test]
fn review_timer_snapshots_and_requested_snapshots_do_not_collide_on_the_store_lock() {
    let env = Env::new();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image()), "--snapshot-every", "100ms"], &sock);
    // Each request reads the whole image (16 MiB), so the timer fires during most of them.
    for i in 0..12 {
        let (code, out, err) = env.run(&["snapshot", s(&env.image()), "--reread", "--json"]);
        assert_eq!(code, 0, "request {i} failed: {out}{err}");
        let snap: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(snap["served"], true, "{snap}");
    }
    server.signal("TERM");
    let (code, out, err) = server.wait();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        !err.contains("periodic snapshot failed"),
        "a timer snapshot collided: {err}"
    );
    assert!(out.contains("snapshot "), "the timer took snapshots: {out}");
}

#[test]
fn review_sigterm_stops_the_server_even_if_its_control_socket_file_was_removed() {
    let env = Env::new();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image())], &sock);
    std::fs::remove_file(control_socket(&env)).expect("remove the control socket");
    std::fs::remove_file(&sock).expect("remove the NBD socket");
    server.signal("TERM");
    let (code, out, err) = server.wait(); // asserts it ends within 20 s
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn review_a_silent_control_client_does_not_hold_up_snapshots() {
    let env = Env::new();
    let sock = env.sock("nbd.sock");
    let server = env.serve(&[s(&env.image())], &sock);
    let silent = UnixStream::connect(control_socket(&env)).expect("connect");
    let (tx, rx) = std::sync::mpsc::channel();
    let cmd = {
        let mut c = env.cmd();
        c.args(["snapshot", s(&env.image()), "--json"]);
        c
    };
    std::thread::spawn(move || {
        let mut cmd = cmd;
        let _ = tx.send(cmd.output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the snapshot waited on a silent control client")
        .expect("run pagesnap");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(snap["served"], true, "{snap}");
    drop(silent);
    server.stop();
}
