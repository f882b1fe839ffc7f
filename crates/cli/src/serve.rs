//! `pagesnap serve`: a raw image read-write over NBD with every write tracked
//! (`pagesnap_engine::tracked`), or a stored snapshot read-only; and the control socket through
//! which `pagesnap snapshot IMAGE` asks a running server for a snapshot.
//!
//! Where things are, for a store S and an image whose canonical path hashes (blake3) to K:
//! `S/served/K.state` (the tracking state) and `S/served/K.sock` (the control socket). The
//! snapshot command computes the same K from its IMAGE argument, so it finds a running server
//! without any flag.
//!
//! Lock ownership: the server holds the image's lock (`flock`) while it runs, and the store's
//! writer lock only while it takes a snapshot (opened for that snapshot, closed after), so
//! `list`, `restore`, `delete`, `gc` and snapshots of other images go on while it serves.

use crate::commands::{Ctx, OK};
use anyhow::{anyhow, bail, Context, Result};
use pagesnap_engine::tracked::{TrackedImage, TrackedSnapshot};
use pagesnap_nbd::{Backend, Export, Extent, Listener, Server};
use pagesnap_store::{Mode, SnapshotId, Store, Vpn};
use serde_json::{json, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where the server of `image` keeps its tracking state and control socket in store `dir`.
pub struct Served {
    pub state: PathBuf,
    pub control: PathBuf,
}

/// The longest Unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How often the control socket's loops look whether the server is stopping.
const POLL: Duration = Duration::from_millis(100);
/// How long a control client may take to send its request, and to take the answer.
const CONTROL_IO: Duration = Duration::from_secs(10);
/// Control clients served at once (each on its own thread); more are answered "busy".
const CONTROL_CLIENTS: usize = 8;
/// The longest control request.
const MAX_REQUEST: usize = 64 << 10;

pub fn served(dir: &Path, image: &Path) -> Result<Served> {
    let canonical = std::fs::canonicalize(image)
        .with_context(|| format!("resolving image {}", image.display()))?;
    let key = blake3::hash(canonical.as_os_str().as_encoded_bytes());
    let key: String = key.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let served = dir.join("served");
    Ok(Served {
        state: served.join(format!("{key}.state")),
        control: served.join(format!("{key}.sock")),
    })
}

/// The settings of `pagesnap serve`.
pub struct ServeArgs {
    pub image: Option<PathBuf>,
    pub snapshot: Option<String>,
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub snapshot_every: Option<Duration>,
    pub name: Option<String>,
}

pub fn serve(ctx: &Ctx, args: ServeArgs) -> Result<i32> {
    // Before anything else, so that a signal at any moment ends the server cleanly.
    let signals =
        Signals::new([SIGTERM, SIGINT]).context("installing the SIGTERM/SIGINT handlers")?;
    match (&args.image, &args.snapshot) {
        (Some(image), None) => serve_image(ctx, image, signals, &args),
        (None, Some(name)) => serve_snapshot(ctx, name, signals, &args),
        _ => bail!("give either IMAGE (serve it read-write) or --snapshot ID|LABEL (serve a snapshot read-only)"),
    }
}

/// Binds the NBD listener, last (once it accepts, everything else is ready): the listener and
/// the URI clients use.
fn listen(args: &ServeArgs) -> Result<(Listener, String)> {
    let listener = match (&args.socket, &args.listen) {
        (Some(p), _) => Listener::bind_unix(p).with_context(|| {
            format!(
                "listening on {} (is another server using it? remove it if not)",
                p.display()
            )
        })?,
        (None, l) => {
            let addr = l.as_deref().unwrap_or("127.0.0.1:10809");
            Listener::bind_tcp(addr)
                .with_context(|| format!("listening on {addr} (is the port in use? pass --listen HOST:PORT or --socket PATH)"))?
        }
    };
    let uri = match &args.socket {
        Some(p) => format!("nbd+unix:///?socket={}", p.display()),
        None => format!("nbd://{}/", listener.describe()),
    };
    Ok((listener, uri))
}

/// Runs `server` until SIGTERM or SIGINT; returns once every connection has ended.
fn run_until_signal<B: Backend>(
    server: &Server<B>,
    listener: Listener,
    mut signals: Signals,
) -> Result<()> {
    let handle = signals.handle();
    let stop = server.shutdown_handle();
    let waiter = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.shutdown();
        }
    });
    let served = server.serve(listener).context("accepting connections");
    handle.close();
    let _ = waiter.join();
    served
}

fn serve_image(ctx: &Ctx, image: &Path, signals: Signals, args: &ServeArgs) -> Result<i32> {
    let dir = ctx.dir()?.to_path_buf();
    let paths = served(&dir, image)?;
    let tracked = {
        let store = ctx.open(Mode::Read)?;
        TrackedImage::open(image, &paths.state, &store)
            .with_context(|| format!("opening {} to serve it", image.display()))?
    };
    let tracked = Arc::new(tracked);
    let control = ControlSocket::bind(&paths.control)?;
    let name = args.name.clone().unwrap_or_else(|| {
        image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mut export = Export::new(name);
    export.description = format!("{} (pagesnap, writes tracked)", image.display());
    // A flush is an fdatasync of the one image file every connection writes: global.
    export.multi_conn = true;
    let t = tracked.tracking();
    let (listener, uri) = listen(args)?;
    println!(
        "serving {} ({} bytes) read-write at {uri}",
        image.display(),
        tracked.size()
    );
    match (&t.full_read, t.base) {
        (Some(why), _) => println!("tracking: the next snapshot reads the whole image once: {why}"),
        (None, Some(b)) => println!("tracking: {} page(s) changed since snapshot {b}", t.pages),
        (None, None) => {}
    }
    let _ = io::stdout().flush();
    let snapper = Arc::new(Snapper {
        tracked: tracked.clone(),
        password: ctx.password_for(&crate::commands::StoreAt::Dir(dir.clone()))?,
        dir: dir.clone(),
        one: Mutex::new(()),
    });
    let stopping = Arc::new(AtomicBool::new(false));
    let control_thread = {
        let (snapper, stopping) = (snapper.clone(), stopping.clone());
        // The thread owns the control socket: its file is removed when the loop ends, before
        // the image's lock is released below (a server started after that keeps its own).
        std::thread::spawn(move || control_loop(control, &snapper, &stopping))
    };
    let (stop_tick, ticks) = mpsc::channel::<()>();
    let ticker = args.snapshot_every.map(|every| {
        let snapper = snapper.clone();
        std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = ticks.recv_timeout(every) {
                match snapper.take(None, false) {
                    Ok(s) => println!("{}", human(&s)),
                    Err(e) => eprintln!("pagesnap: warning: the periodic snapshot failed: {e:#}"),
                }
                let _ = io::stdout().flush();
            }
        })
    });
    let mut server = Server::new(ImageBackend(tracked.clone()), export);
    server.set_log(|m| eprintln!("pagesnap: serve: {m}"));
    let served = run_until_signal(&server, listener, signals);
    // Connections have ended: stop taking snapshots (one running finishes first).
    drop(stop_tick);
    if let Some(t) = ticker {
        let _ = t.join();
    }
    stopping.store(true, Ordering::Release);
    let _ = control_thread.join();
    drop(server);
    drop(snapper);
    served?;
    let tracked =
        Arc::try_unwrap(tracked).map_err(|_| anyhow!("the image is still in use at shutdown"))?;
    let t = tracked
        .close()
        .with_context(|| format!("saving the tracking state of {}", image.display()))?;
    println!(
        "stopped: {} page(s) tracked{}; saved in {}",
        t.pages,
        t.base
            .map(|b| format!(" since snapshot {b}"))
            .unwrap_or_default(),
        paths.state.display()
    );
    Ok(OK)
}

/// The control socket: its listener (non-blocking: the loop polls it), and its file, removed
/// when this is dropped if the path still names the socket this server made — a server of the
/// same image started since (once this one released the image's lock) keeps its own.
struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file it made.
    id: (u64, u64),
}

impl ControlSocket {
    /// Binds the control socket, replacing one a killed server left.
    fn bind(path: &Path) -> Result<ControlSocket> {
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the control socket path {} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} bytes); use a store directory with a shorter path",
                path.display()
            );
        }
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    bail!(
                        "another pagesnap serve of this image answers on {}; stop it first",
                        path.display()
                    );
                }
                std::fs::remove_file(path).with_context(|| {
                    format!("removing the stale control socket {}", path.display())
                })?;
                UnixListener::bind(path)
                    .with_context(|| format!("binding the control socket {}", path.display()))?
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("binding the control socket {}", path.display()))
            }
        };
        let m = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading the control socket {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("setting up the control socket {}", path.display()))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Snapshots of the served image, one at a time — the timer's and those asked for on the
/// control socket: the store is opened as the writer only once the snapshot before is done, so
/// they wait for each other instead of colliding on the store's writer lock.
struct Snapper {
    tracked: Arc<TrackedImage>,
    /// An encrypted store's password (asked once, when the server starts).
    password: Option<pagesnap_store::keys::Password>,
    dir: PathBuf,
    one: Mutex<()>,
}

impl Snapper {
    /// A snapshot of the served image: the store is opened as the writer for just this snapshot.
    fn take(&self, label: Option<String>, reread: bool) -> Result<TrackedSnapshot> {
        let _one = self.one.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut store, _) = Store::open_encrypted(&self.dir, Mode::Write, self.password.as_ref())
            .with_context(|| format!("opening store {} for the snapshot", self.dir.display()))?;
        self.tracked
            .snapshot(&mut store, label, reread, &|_| {})
            .with_context(|| format!("snapshotting {}", self.tracked.path().display()))
    }
}

/// Answers control requests (one JSON line each), each client on its own thread, until
/// `stopping`; returns once the clients' threads have ended (a snapshot they asked for
/// included), and drops the socket.
fn control_loop(control: ControlSocket, snapper: &Snapper, stopping: &AtomicBool) {
    let clients = AtomicUsize::new(0);
    std::thread::scope(|s| {
        while !stopping.load(Ordering::Acquire) {
            // Polled, not blocked in: the stop is seen whatever became of the socket's path.
            match pagesnap_nbd::wait_readable(control.listener.as_fd(), POLL) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    eprintln!("pagesnap: warning: the control socket {} failed ({e}): snapshot requests are no longer answered", control.path.display());
                    return;
                }
            }
            let conn = match control.listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => {
                    // Out of descriptors, say: let clients end first.
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            if clients.fetch_add(1, Ordering::AcqRel) >= CONTROL_CLIENTS {
                clients.fetch_sub(1, Ordering::AcqRel);
                let busy = json!({"ok": false, "error": format!("the server is answering {CONTROL_CLIENTS} other requests; try again")});
                let _ = conn
                    .set_nonblocking(false)
                    .and_then(|()| conn.set_write_timeout(Some(POLL)));
                let mut w = &conn;
                let _ = writeln!(w, "{busy}");
                continue;
            }
            let clients = &clients;
            s.spawn(move || {
                control_client(&conn, snapper, stopping);
                clients.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
}

/// One control client: its request, within [`CONTROL_IO`], and the answer.
fn control_client(conn: &UnixStream, snapper: &Snapper, stopping: &AtomicBool) {
    let reply = match read_request(conn, stopping) {
        Ok(req) => answer(&req, snapper),
        Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
    };
    let _ = conn.set_write_timeout(Some(CONTROL_IO));
    let mut w = conn;
    let _ = writeln!(w, "{reply}");
}

/// Reads one request line, giving up after [`CONTROL_IO`] or when the server stops.
fn read_request(conn: &UnixStream, stopping: &AtomicBool) -> Result<Value> {
    conn.set_nonblocking(false)
        .and_then(|()| conn.set_read_timeout(Some(POLL)))
        .context("setting up the control connection")?;
    let deadline = Instant::now() + CONTROL_IO;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let mut r = conn;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(end);
                    break;
                }
                if line.len() > MAX_REQUEST {
                    bail!("the request is longer than {MAX_REQUEST} bytes");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stopping.load(Ordering::Acquire) {
                    bail!("the server is stopping");
                }
                if Instant::now() >= deadline {
                    bail!("no request within {} s", CONTROL_IO.as_secs());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the request"),
        }
    }
    serde_json::from_slice(&line).context("parsing the request")
}

fn answer(req: &Value, snapper: &Snapper) -> Value {
    let op = req.get("op").and_then(Value::as_str).unwrap_or("");
    match op {
        "snapshot" => {
            let label = req.get("label").and_then(Value::as_str).map(str::to_string);
            let reread = req.get("reread").and_then(Value::as_bool).unwrap_or(false);
            if let Some(Err(e)) = label.as_deref().map(pagesnap_engine::names::check_label) {
                return json!({"ok": false, "error": e});
            }
            match snapper.take(label, reread) {
                Ok(s) => json!({"ok": true, "report": report_json(&s)}),
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            }
        }
        other => json!({"ok": false, "error": format!("unknown request '{other}'")}),
    }
}

pub fn report_json(s: &TrackedSnapshot) -> Value {
    let r = &s.snapshot;
    json!({
        "id": r.id.0,
        "image_size": r.image_size,
        "pages_read": r.pages_read,
        "pages_changed": r.pages_changed,
        "pages_written": r.pages_written,
        "bytes_written": r.data_bytes + r.meta_bytes,
        "data_bytes": r.data_bytes,
        "meta_bytes": r.meta_bytes,
        "seconds": r.seconds,
        "unchanged": r.unchanged,
        "served": true,
        "pages_tracked": s.pages_tracked,
        "full_read": s.full_read,
    })
}

fn human(s: &TrackedSnapshot) -> String {
    let r = &s.snapshot;
    let full = s
        .full_read
        .as_deref()
        .map(|w| format!("; read whole: {w}"))
        .unwrap_or_default();
    format!(
        "snapshot {}: {} page(s) tracked, {} read, {} changed, {} new in {:.2} s{full}",
        r.id, s.pages_tracked, r.pages_read, r.pages_changed, r.pages_written, r.seconds
    )
}

/// `pagesnap snapshot IMAGE` while a server of IMAGE runs: asks it. `None` if no server answers
/// on the control socket (none runs; a killed one's socket file may be left).
pub fn snapshot_via_server(
    dir: &Path,
    image: &Path,
    label: Option<&str>,
    reread: bool,
) -> Result<Option<Value>> {
    let Ok(paths) = served(dir, image) else {
        return Ok(None);
    };
    let conn = match UnixStream::connect(&paths.control) {
        Ok(c) => c,
        Err(_) => return Ok(None),
    };
    let canonical = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let req = json!({"op": "snapshot", "image": canonical, "label": label, "reread": reread});
    let mut w = &conn;
    writeln!(w, "{req}").context("sending the snapshot request to the server")?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .with_context(|| format!("reading the server's answer on {}", paths.control.display()))?;
    let v: Value = serde_json::from_str(&line).with_context(|| {
        format!(
            "the server on {} answered something unexpected",
            paths.control.display()
        )
    })?;
    if v.get("ok").and_then(Value::as_bool) != Some(true) {
        let e = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        bail!(
            "the server of {} could not take the snapshot: {e}",
            image.display()
        );
    }
    v.get("report")
        .cloned()
        .map(Some)
        .ok_or_else(|| anyhow!("the server's answer has no report"))
}

/// The served image as an NBD backend.
struct ImageBackend(Arc<TrackedImage>);

impl Backend for ImageBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.0.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, fua: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, may_punch, fua)
    }
    fn block_status(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let mut runs = Vec::new();
        self.0.extents(offset, len, &mut runs)?;
        out.extend(runs.into_iter().map(|(len, hole)| Extent {
            len,
            hole,
            zero: hole,
        }));
        Ok(())
    }
}

fn serve_snapshot(ctx: &Ctx, name: &str, signals: Signals, args: &ServeArgs) -> Result<i32> {
    if args.snapshot_every.is_some() {
        bail!("--snapshot-every is for a served image; a snapshot export is read-only");
    }
    let store = ctx.open(Mode::Read)?;
    let id = crate::commands::resolve(&store, name)?;
    let info = store.snapshot(id)?;
    let mut export = Export::new(
        args.name
            .clone()
            .unwrap_or_else(|| format!("snapshot-{id}")),
    );
    export.read_only = true;
    export.multi_conn = true;
    export.description = format!(
        "pagesnap snapshot {id}{} of {}",
        info.label
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default(),
        ctx.dir()?.display()
    );
    let (listener, uri) = listen(args)?;
    println!(
        "serving snapshot {id} ({} bytes) read-only at {uri}",
        info.logical_size
    );
    let _ = io::stdout().flush();
    let mut server = Server::new(
        SnapshotBackend {
            store,
            id,
            size: info.logical_size,
            ps: u64::from(info.page_size),
        },
        export,
    );
    server.set_log(|m| eprintln!("pagesnap: serve: {m}"));
    run_until_signal(&server, listener, signals)?;
    println!("stopped");
    Ok(OK)
}

/// A stored snapshot as a read-only NBD backend: reads come from the store (every page checked),
/// pages it does not hold read as zeros and are reported as holes.
struct SnapshotBackend {
    store: Store,
    id: SnapshotId,
    size: u64,
    ps: u64,
}

fn store_io(e: pagesnap_store::StoreError) -> io::Error {
    io::Error::other(e.to_string())
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "a snapshot export is read-only",
    )
}

impl Backend for SnapshotBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / self.ps, end.div_ceil(self.ps));
        let mut refs = Vec::new();
        self.store
            .for_each_page_in(self.id, Vpn(first)..Vpn(last), |v, r| {
                refs.push((v.0, *r));
                Ok(())
            })
            .map_err(store_io)?;
        for (v, r) in refs {
            let page = self.store.read_ref(&r).map_err(store_io)?;
            let (ps, pe) = (v * self.ps, v * self.ps + page.len() as u64);
            let (s, e) = (ps.max(offset), pe.min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&page[(s - ps) as usize..(e - ps) as usize]);
            }
        }
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(read_only())
    }
    fn block_status(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        // At most 64 MiB a reply: a client asks again from where it ends.
        let end = offset.saturating_add(len.min(64 << 20)).min(self.size);
        let (first, last) = (offset / self.ps, end.div_ceil(self.ps));
        let mut present = Vec::new();
        self.store
            .for_each_page_in(self.id, Vpn(first)..Vpn(last), |v, _| {
                present.push(v.0);
                Ok(())
            })
            .map_err(store_io)?;
        let mut at = offset;
        let mut push = |to: u64, hole: bool| {
            let to = to.min(end);
            if to > at {
                match out.last_mut() {
                    Some(e) if e.hole == hole => e.len += to - at,
                    _ => out.push(Extent {
                        len: to - at,
                        hole,
                        zero: hole,
                    }),
                }
                at = to;
            }
        };
        for v in present {
            push(v * self.ps, true);
            push((v + 1) * self.ps, false);
        }
        push(end, true);
        Ok(())
    }
}

/// `30s`, `15m`, `2h`, `500ms`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: write e.g. 30s, 15m, 2h or 500ms"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs >= 0.1) {
        return Err(format!(
            "'{s}' is too short: at least 100ms between snapshots"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_a_stopping_server_leaves_a_newer_servers_control_socket_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("served/k.sock");
        let old = ControlSocket::bind(&path).expect("bind");
        // The old server released the image's lock before its socket file was gone (the order
        // before the fix): a new server of the image starts and binds the same path, replacing
        // the file...
        std::fs::remove_file(&path).expect("stale socket removed by the new server");
        let new = ControlSocket::bind(&path).expect("the new server binds");
        // ...then the old server finishes stopping: the new socket stays.
        drop(old);
        assert!(
            UnixStream::connect(&path).is_ok(),
            "the new server's control socket was removed by the old one"
        );
        drop(new);
        assert!(!path.exists(), "a server removes its own socket");
    }
}
