//! The server: listening, the handshake (option haggling) and the transmission phase of each
//! connection.

use crate::proto::*;
use crate::{Backend, Export, Extent, MAX_PAYLOAD, PREFERRED_BLOCK};
use std::fmt;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a blocked accept, read or write looks whether the server is shutting down.
const POLL: Duration = Duration::from_millis(100);

/// The server's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once (default 64). One more is closed as it comes, without a
    /// greeting, and the server logs that it is refusing connections.
    pub connections: usize,
    /// How long a connection may take from its acceptance to the end of option haggling
    /// (default 30 s): a client that connects and says nothing is dropped then, so silent
    /// connections cannot hold every slot. A connection in transmission may stay idle: NBD
    /// clients keep idle connections open.
    pub handshake: Duration,
    /// How long a shutdown waits for a connection in the middle of a request — a client that
    /// stopped sending half way through a write's payload, or stopped reading its replies —
    /// before that connection is dropped (default 5 s).
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: 64,
            handshake: Duration::from_secs(30),
            drain: Duration::from_secs(5),
        }
    }
}

/// A byte stream a connection runs over: a Unix or TCP socket.
pub trait Transport: Read + Write + Send + Sized {
    /// A second handle to the same socket (one reads, one writes).
    fn try_clone(&self) -> io::Result<Self>;
    /// How long a read may block.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// How long a write may block.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl Transport for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

/// Waits up to `timeout` for `fd` to be readable — for a listening socket, for a connection to
/// accept. `Ok(false)` on timeout (or a signal). The server's accept loop waits this way, so a
/// shutdown is noticed within a poll period without a wake-up through the socket's path.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `p` is one initialised `pollfd` that outlives the call, and the count passed is 1;
    // its descriptor is borrowed, hence open for the whole call.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// Where the server listens. A Unix socket's file is removed when the listener is dropped (if
/// the path still names the socket this listener made).
#[derive(Debug)]
pub enum Listener {
    /// A Unix domain socket.
    Unix {
        /// The listening socket.
        listener: UnixListener,
        /// Its path.
        path: PathBuf,
        /// (device, inode) of the socket file it made.
        id: (u64, u64),
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on a Unix socket at `path`. A socket file already there that nothing accepts on
    /// (left by a server that was killed) is replaced; one that a server answers on is not
    /// (`AddrInUse`), nor is any other kind of file.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let m = std::fs::symlink_metadata(path)?;
                let stale = m.file_type().is_socket()
                    && matches!(UnixStream::connect(path),
                        Err(c) if c.kind() == io::ErrorKind::ConnectionRefused);
                if !stale {
                    return Err(e);
                }
                std::fs::remove_file(path)?;
                UnixListener::bind(path)?
            }
            Err(e) => return Err(e),
        };
        let m = std::fs::symlink_metadata(path)?;
        Ok(Listener::Unix {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    }

    /// Listens on TCP at `addr` (`HOST:PORT`).
    pub fn bind_tcp(addr: impl ToSocketAddrs) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Where clients connect: the socket's path, or `HOST:PORT`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => path.display().to_string(),
            Listener::Tcp(t) => t
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
        }
    }

    /// The listening socket's descriptor.
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix { listener, .. } => listener.as_fd(),
            Listener::Tcp(t) => t.as_fd(),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix { listener, .. } => listener.set_nonblocking(on),
            Listener::Tcp(t) => t.set_nonblocking(on),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, id, .. } = self {
            if std::fs::symlink_metadata(&*path).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                let _ = std::fs::remove_file(&*path);
            }
        }
    }
}

/// Where the server's messages go (a connection limit reached, and left).
struct Log(Box<dyn Fn(&str) + Send + Sync>);

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Log")
    }
}

impl Default for Log {
    fn default() -> Log {
        Log(Box::new(|m| eprintln!("nbd: {m}")))
    }
}

#[derive(Debug, Default)]
struct Shared {
    shutdown: AtomicBool,
    since: Mutex<Option<Instant>>,
    connections: AtomicUsize,
    limits: Limits,
    log: Log,
    /// New connections are being refused (the limit was reached).
    refusing: AtomicBool,
    /// Connections refused since the limit was last reached.
    refused: AtomicU64,
}

impl Shared {
    fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
    /// The shutdown began more than [`Limits::drain`] ago.
    fn drain_over(&self) -> bool {
        self.since
            .lock()
            .map(|s| s.is_some_and(|t| t.elapsed() > self.limits.drain))
            .unwrap_or(true)
    }
}

/// Stops a [`Server`]: may be sent to another thread (a signal handler's).
#[derive(Clone, Debug)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Stops accepting connections (within a poll period: the accept loop polls, so nothing
    /// needs to reach the socket); each connection finishes the request it is in, answers the
    /// requests already sent with `NBD_ESHUTDOWN`, and closes. A connection still in the middle
    /// of a request, or whose client does not read its replies, after [`Limits::drain`] is
    /// dropped. [`Server::serve`] then returns.
    pub fn shutdown(&self) {
        if let Ok(mut s) = self.0.since.lock() {
            s.get_or_insert_with(Instant::now);
        }
        self.0.shutdown.store(true, Ordering::Release);
    }

    /// Whether [`ShutdownHandle::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.0.shutting_down()
    }
}

/// An NBD server of one export.
#[derive(Debug)]
pub struct Server<B> {
    backend: B,
    export: Export,
    shared: Arc<Shared>,
}

/// What the client and the server agreed on in the handshake.
#[derive(Clone, Copy, Debug, Default)]
struct Session {
    no_zeroes: bool,
    structured: bool,
    /// `base:allocation` is selected.
    meta: bool,
}

/// A request's failure: the NBD error and a message for the client.
#[derive(Debug)]
struct Fail {
    code: u32,
    msg: String,
}

fn fail(code: u32, msg: impl Into<String>) -> Fail {
    Fail {
        code,
        msg: msg.into(),
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail {
            code: errno_of(&e),
            msg: e.to_string(),
        }
    }
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("nbd: {msg}"))
}

impl<B: Backend> Server<B> {
    /// A server of `export`, backed by `backend`, with the default [`Limits`].
    pub fn new(backend: B, export: Export) -> Server<B> {
        Server::with_limits(backend, export, Limits::default())
    }

    /// A server of `export`, backed by `backend`, with `limits`.
    pub fn with_limits(backend: B, export: Export, limits: Limits) -> Server<B> {
        Server {
            backend,
            export,
            shared: Arc::new(Shared {
                limits,
                ..Shared::default()
            }),
        }
    }

    /// Where the server's messages go (default: standard error, prefixed `nbd: `): that it
    /// reached its connection limit and refuses new connections, and that it accepts again.
    /// Call before [`Server::serve`].
    pub fn set_log(&mut self, log: impl Fn(&str) + Send + Sync + 'static) {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.log = Log(Box::new(log));
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A handle that stops the server from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// Accepts connections until [`ShutdownHandle::shutdown`], one thread each; returns once
    /// every connection has ended. A connection's own errors (a client that breaks the protocol
    /// or goes away) end that connection only.
    pub fn serve(&self, listener: Listener) -> io::Result<()> {
        // Polled, not blocked in: a shutdown is seen within a poll period, whatever became of
        // the socket's path.
        listener.set_nonblocking(true)?;
        std::thread::scope(|s| -> io::Result<()> {
            loop {
                if self.shared.shutting_down() {
                    return Ok(());
                }
                match wait_readable(listener.fd(), POLL) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        self.shutdown_handle().shutdown();
                        return Err(e);
                    }
                }
                if self.shared.shutting_down() {
                    return Ok(());
                }
                let accepted = match &listener {
                    Listener::Unix { listener, .. } => listener.accept().map(|(c, _)| Ok(c)),
                    Listener::Tcp(t) => t.accept().map(|(c, _)| Err(c)),
                };
                let conn = match accepted {
                    Ok(c) => c,
                    Err(e) => match e.raw_os_error() {
                        // Out of descriptors: let connections end, then accept again.
                        Some(libc::ENFILE | libc::EMFILE) => {
                            std::thread::sleep(POLL);
                            continue;
                        }
                        _ if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::ConnectionAborted
                                | io::ErrorKind::Interrupted
                        ) =>
                        {
                            continue
                        }
                        _ => {
                            self.shutdown_handle().shutdown();
                            return Err(e);
                        }
                    },
                };
                if !self.admit() {
                    continue; // dropped: closed
                }
                s.spawn(move || {
                    let _ = match conn {
                        Ok(u) => u.set_nonblocking(false).and_then(|()| self.handle(u)),
                        Err(t) => t
                            .set_nonblocking(false)
                            .and_then(|()| t.set_nodelay(true))
                            .and_then(|()| self.handle(t)),
                    };
                    self.shared.connections.fetch_sub(1, Ordering::AcqRel);
                });
            }
        })
    }

    /// Counts a new connection in, or refuses it at the limit; logs when refusing starts and
    /// when it ends (not each refusal: a flood of connections is one line).
    fn admit(&self) -> bool {
        let sh = &self.shared;
        let max = sh.limits.connections;
        if sh.connections.fetch_add(1, Ordering::AcqRel) >= max {
            sh.connections.fetch_sub(1, Ordering::AcqRel);
            sh.refused.fetch_add(1, Ordering::AcqRel);
            if !sh.refusing.swap(true, Ordering::AcqRel) {
                (sh.log.0)(&format!(
                    "{max} connections are open, the most this server takes: new connections are closed until one ends (one that says nothing is dropped {} s after it connected)",
                    sh.limits.handshake.as_secs()
                ));
            }
            return false;
        }
        if sh.refusing.swap(false, Ordering::AcqRel) {
            let n = sh.refused.swap(0, Ordering::AcqRel);
            (sh.log.0)(&format!(
                "accepting connections again ({n} closed at the limit meanwhile)"
            ));
        }
        true
    }

    /// Serves one connection to its end: the handshake, then requests until the client
    /// disconnects or the server shuts down. `Err` if the client broke the protocol, did not
    /// finish the handshake within [`Limits::handshake`], or the socket failed.
    pub fn handle<T: Transport>(&self, stream: T) -> io::Result<()> {
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(POLL))?;
        let mut c = Conn {
            server: self,
            input: Input {
                r: BufReader::with_capacity(64 << 10, stream.try_clone()?),
                shared: &self.shared,
                deadline: Some(Instant::now() + self.shared.limits.handshake),
            },
            out: BufWriter::with_capacity(
                256 << 10,
                Output {
                    w: stream,
                    shared: &self.shared,
                },
            ),
        };
        let r = match c.handshake() {
            Ok(Some(session)) => {
                c.input.deadline = None;
                c.transmit(session)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        let flushed = c.out.flush();
        r.and(flushed)
    }
}

/// The write side of a connection: writes that block are retried every poll period, until the
/// server is shutting down and [`Limits::drain`] is over — so a client that stops reading its
/// replies holds its connection's thread, but not a shutdown.
struct Output<'a, T: Transport> {
    w: T,
    shared: &'a Shared,
}

impl<T: Transport> Write for Output<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.w.write(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.shutting_down() && self.shared.drain_over() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "nbd: the client does not read its replies and the server is shutting down",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The read side of a connection: reads whole messages, and notices a shutdown while idle.
struct Input<'a, T: Transport> {
    r: BufReader<T>,
    shared: &'a Shared,
    /// Reads fail once this passes (the handshake's deadline).
    deadline: Option<Instant>,
}

impl<T: Transport> Input<'_, T> {
    /// Fills `buf`. `Ok(false)` at the start of a message (`start`): the client closed the
    /// connection, or the server is shutting down and nothing more was sent. In the middle of a
    /// message the end of the stream is an error (the message is dropped whole).
    fn read(&mut self, buf: &mut [u8], start: bool) -> io::Result<bool> {
        let mut n = 0;
        while n < buf.len() {
            // Checked at every read, so a client that trickles bytes is held to it too.
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nbd: the client did not finish the handshake within {} s",
                        self.shared.limits.handshake.as_secs_f64()
                    ),
                ));
            }
            match self.r.read(&mut buf[n..]) {
                Ok(0) if n == 0 && start => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => n += k,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.shutting_down() {
                        if n == 0 && start {
                            return Ok(false);
                        }
                        if self.shared.drain_over() {
                            return Err(e);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads and drops `len` bytes.
    fn skip(&mut self, mut len: u64) -> io::Result<()> {
        let mut scratch = [0u8; 8192];
        while len > 0 {
            let n = len.min(scratch.len() as u64) as usize;
            self.read(&mut scratch[..n], false)?;
            len -= n as u64;
        }
        Ok(())
    }
}

struct Conn<'a, B, T: Transport> {
    server: &'a Server<B>,
    input: Input<'a, T>,
    out: BufWriter<Output<'a, T>>,
}

impl<B: Backend, T: Transport> Conn<'_, B, T> {
    fn export(&self) -> &Export {
        &self.server.export
    }

    /// The export a name asks for: its own name, or the default (empty) name.
    fn known(&self, name: &str) -> bool {
        name.is_empty() || name == self.export().name
    }

    fn transmission_flags(&self, s: &Session) -> u16 {
        let e = self.export();
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
        if e.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if s.structured {
            f |= FLAG_SEND_DF;
        }
        if e.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        f
    }

    fn option_reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| protocol("option reply too long"))?;
        let m = Msg::default()
            .u64(OPT_REPLY_MAGIC)
            .u32(opt)
            .u32(kind)
            .u32(len)
            .bytes(data);
        self.out.write_all(&m.0)
    }

    /// An error reply to an option, with a message.
    fn option_error(&mut self, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
        self.option_reply(opt, kind, msg.as_bytes())?;
        self.out.flush()
    }

    /// Option haggling. `Some` once the client enters transmission, `None` if it left.
    fn handshake(&mut self) -> io::Result<Option<Session>> {
        let greeting = Msg::default()
            .u64(NBDMAGIC)
            .u64(IHAVEOPT)
            .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.out.write_all(&greeting.0)?;
        self.out.flush()?;
        let mut b = [0u8; 4];
        if !self.input.read(&mut b, true)? {
            return Ok(None);
        }
        let cflags = u32::from_be_bytes(b);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(protocol("the client set unknown handshake flags"));
        }
        let mut s = Session {
            no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
            ..Session::default()
        };
        loop {
            let mut h = [0u8; 16];
            if !self.input.read(&mut h, true)? {
                return Ok(None);
            }
            let magic = u64::from_be_bytes(h[0..8].try_into().map_err(|_| protocol("header"))?);
            let opt = u32::from_be_bytes(h[8..12].try_into().map_err(|_| protocol("header"))?);
            let len = u32::from_be_bytes(h[12..16].try_into().map_err(|_| protocol("header"))?);
            if magic != IHAVEOPT {
                return Err(protocol("an option without the IHAVEOPT magic"));
            }
            if len > MAX_OPTION_DATA {
                self.input.skip(u64::from(len))?;
                if opt == OPT_EXPORT_NAME {
                    return Err(protocol("export name too long"));
                }
                self.option_error(opt, REP_ERR_TOO_BIG, "option data too long")?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            self.input.read(&mut data, false)?;
            if self.input.shared.shutting_down() && opt != OPT_ABORT {
                if opt == OPT_EXPORT_NAME {
                    return Ok(None);
                }
                self.option_error(opt, REP_ERR_SHUTDOWN, "the server is shutting down")?;
                continue;
            }
            match opt {
                OPT_EXPORT_NAME => {
                    let name = std::str::from_utf8(&data).unwrap_or("\0");
                    if !self.known(name) {
                        // No way to say why with this option: the spec says disconnect.
                        return Err(protocol("NBD_OPT_EXPORT_NAME for an unknown export"));
                    }
                    let mut m = Msg::default()
                        .u64(self.server.backend.size())
                        .u16(self.transmission_flags(&s));
                    if !s.no_zeroes {
                        m = m.bytes(&[0u8; 124]);
                    }
                    self.out.write_all(&m.0)?;
                    self.out.flush()?;
                    return Ok(Some(s));
                }
                OPT_ABORT => {
                    self.option_reply(opt, REP_ACK, &[])?;
                    self.out.flush()?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.option_error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let e = self.export();
                    let m = Msg::default()
                        .u32(e.name.len() as u32)
                        .bytes(e.name.as_bytes())
                        .bytes(e.description.as_bytes());
                    self.option_reply(opt, REP_SERVER, &m.0)?;
                    self.option_reply(opt, REP_ACK, &[])?;
                    self.out.flush()?;
                }
                OPT_INFO | OPT_GO => {
                    if self.info(opt, &data, &s)? && opt == OPT_GO {
                        return Ok(Some(s));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.option_error(
                            opt,
                            REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        )?;
                        continue;
                    }
                    s.structured = true;
                    self.option_reply(opt, REP_ACK, &[])?;
                    self.out.flush()?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(opt, &data, &mut s)?;
                }
                _ => {
                    self.option_error(opt, REP_ERR_UNSUP, "option not supported by this server")?;
                }
            }
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`; true if the reply ended in `NBD_REP_ACK`.
    fn info(&mut self, opt: u32, data: &[u8], s: &Session) -> io::Result<bool> {
        let mut c = Cursor(data);
        let parsed = (|| {
            let n = c.u32()?;
            let name = c.string(n)?;
            let count = c.u16()?;
            let reqs: Vec<u16> = (0..count).map(|_| c.u16()).collect::<Option<_>>()?;
            c.0.is_empty().then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            self.option_error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO")?;
            return Ok(false);
        };
        if !self.known(name) {
            let msg = format!(
                "no export named '{name}': this server has '{}' (or the default, empty name)",
                self.export().name
            );
            self.option_error(opt, REP_ERR_UNKNOWN, &msg)?;
            return Ok(false);
        }
        let export = Msg::default()
            .u16(INFO_EXPORT)
            .u64(self.server.backend.size())
            .u16(self.transmission_flags(s));
        self.option_reply(opt, REP_INFO, &export.0)?;
        for r in reqs {
            let m = match r {
                INFO_NAME => Msg::default()
                    .u16(INFO_NAME)
                    .bytes(self.export().name.as_bytes()),
                INFO_DESCRIPTION if !self.export().description.is_empty() => Msg::default()
                    .u16(INFO_DESCRIPTION)
                    .bytes(self.export().description.as_bytes()),
                INFO_BLOCK_SIZE => Msg::default()
                    .u16(INFO_BLOCK_SIZE)
                    .u32(1)
                    .u32(PREFERRED_BLOCK)
                    .u32(MAX_PAYLOAD),
                _ => continue,
            };
            self.option_reply(opt, REP_INFO, &m.0)?;
        }
        self.option_reply(opt, REP_ACK, &[])?;
        self.out.flush()?;
        Ok(true)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` (only `base:allocation`).
    fn meta_context(&mut self, opt: u32, data: &[u8], s: &mut Session) -> io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            s.meta = false; // replaced, even if this request fails
        }
        if !s.structured {
            return self.option_error(
                opt,
                REP_ERR_INVALID,
                "negotiate structured replies (NBD_OPT_STRUCTURED_REPLY) first",
            );
        }
        let mut c = Cursor(data);
        let parsed = (|| {
            let n = c.u32()?;
            let name = c.string(n)?;
            let count = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                let n = c.u32()?;
                queries.push(c.string(n)?);
            }
            c.0.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return self.option_error(opt, REP_ERR_INVALID, "malformed meta context request");
        };
        if !self.known(name) {
            return self.option_error(opt, REP_ERR_UNKNOWN, "no such export");
        }
        let selects = if set {
            queries.contains(&META_BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == "base:" || *q == META_BASE_ALLOCATION)
        };
        if selects {
            let id = if set { META_ID_ALLOCATION } else { 0 };
            let m = Msg::default()
                .u32(id)
                .bytes(META_BASE_ALLOCATION.as_bytes());
            self.option_reply(opt, REP_META_CONTEXT, &m.0)?;
            s.meta = set;
        }
        self.option_reply(opt, REP_ACK, &[])?;
        self.out.flush()
    }

    /// The transmission phase: requests until `NBD_CMD_DISC`, the end of the stream, or a
    /// shutdown.
    fn transmit(&mut self, s: Session) -> io::Result<()> {
        let size = self.server.backend.size();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if self.input.r.buffer().is_empty() {
                // Nothing more is waiting: send the replies gathered so far.
                self.out.flush()?;
            }
            if self.input.shared.shutting_down() && self.input.shared.drain_over() {
                // A client that keeps sending requests (each answered NBD_ESHUTDOWN) does not
                // hold a shutdown past the drain period either.
                return Ok(());
            }
            let mut h = [0u8; 28];
            if !self.input.read(&mut h, true)? {
                return Ok(());
            }
            let be32 =
                |r: std::ops::Range<usize>| u32::from_be_bytes(h[r].try_into().unwrap_or([0; 4]));
            let magic = be32(0..4);
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let kind = u16::from_be_bytes([h[6], h[7]]);
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
            let offset = u64::from_be_bytes(h[16..24].try_into().unwrap_or([0; 8]));
            let len = be32(24..28);
            if magic != REQUEST_MAGIC {
                return Err(protocol("a request without the request magic"));
            }
            let shutting = self.input.shared.shutting_down();
            let past_end = offset.checked_add(u64::from(len)).is_none_or(|e| e > size);
            let ro = self.export().read_only;
            let b = &self.server.backend;
            let result: Result<(), Fail> = match kind {
                CMD_DISC => return Ok(()),
                CMD_WRITE => {
                    // The payload is read whole before anything is checked or applied.
                    if len > MAX_PAYLOAD || shutting {
                        self.input.skip(u64::from(len))?;
                        if shutting {
                            Err(fail(ESHUTDOWN, "the server is shutting down"))
                        } else {
                            Err(fail(
                                EINVAL,
                                format!("a write of {len} bytes is over the maximum payload of {MAX_PAYLOAD}"),
                            ))
                        }
                    } else {
                        let n = len as usize;
                        if buf.len() < n {
                            buf.resize(n, 0);
                        }
                        self.input.read(&mut buf[..n], false)?;
                        check_flags(flags, CMD_FLAG_FUA)
                            .and_then(|()| writable(ro))
                            .and_then(|()| in_bounds(past_end, ENOSPC, offset, len, size))
                            .and_then(|()| {
                                if n == 0 {
                                    return Ok(());
                                }
                                b.write(offset, &buf[..n], flags & CMD_FLAG_FUA != 0)
                                    .map_err(Fail::from)
                            })
                    }
                }
                CMD_READ => {
                    let r = if shutting {
                        Err(fail(ESHUTDOWN, "the server is shutting down"))
                    } else {
                        let allowed = CMD_FLAG_FUA | if s.structured { CMD_FLAG_DF } else { 0 };
                        check_flags(flags, allowed)
                            .and_then(|()| {
                                if len > MAX_PAYLOAD {
                                    let code = if s.structured { EOVERFLOW } else { EINVAL };
                                    return Err(fail(code, format!("a read of {len} bytes is over the maximum payload of {MAX_PAYLOAD}")));
                                }
                                Ok(())
                            })
                            .and_then(|()| in_bounds(past_end, EINVAL, offset, len, size))
                            .and_then(|()| {
                                let n = len as usize;
                                if buf.len() < n {
                                    buf.resize(n, 0);
                                }
                                if n > 0 {
                                    b.read(offset, &mut buf[..n]).map_err(Fail::from)?;
                                }
                                Ok(())
                            })
                    };
                    match r {
                        Ok(()) => self.read_reply(&s, cookie, offset, &buf[..len as usize])?,
                        Err(f) => self.error_reply(&s, cookie, f)?,
                    }
                    continue;
                }
                // A flush is honoured even while shutting down: it only makes durable what
                // was already acknowledged.
                CMD_FLUSH => {
                    check_flags(flags, CMD_FLAG_FUA).and_then(|()| b.flush().map_err(Fail::from))
                }
                _ if shutting => Err(fail(ESHUTDOWN, "the server is shutting down")),
                CMD_TRIM => check_flags(flags, CMD_FLAG_FUA)
                    .and_then(|()| writable(ro))
                    .and_then(|()| in_bounds(past_end, EINVAL, offset, len, size))
                    .and_then(|()| {
                        if len == 0 {
                            return Ok(());
                        }
                        b.trim(offset, u64::from(len), flags & CMD_FLAG_FUA != 0)
                            .map_err(Fail::from)
                    }),
                CMD_WRITE_ZEROES => check_flags(flags, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)
                    .and_then(|()| writable(ro))
                    .and_then(|()| in_bounds(past_end, ENOSPC, offset, len, size))
                    .and_then(|()| {
                        if len == 0 {
                            return Ok(());
                        }
                        b.write_zeroes(
                            offset,
                            u64::from(len),
                            flags & CMD_FLAG_NO_HOLE == 0,
                            flags & CMD_FLAG_FUA != 0,
                        )
                        .map_err(Fail::from)
                    }),
                CMD_CACHE => check_flags(flags, CMD_FLAG_FUA)
                    .and_then(|()| in_bounds(past_end, EINVAL, offset, len, size)),
                CMD_BLOCK_STATUS => {
                    let r = check_flags(flags, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE)
                        .and_then(|()| {
                            if !(s.structured && s.meta) {
                                return Err(fail(EINVAL, "no metadata context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)"));
                            }
                            if len == 0 {
                                return Err(fail(EINVAL, "block status of 0 bytes"));
                            }
                            Ok(())
                        })
                        .and_then(|()| in_bounds(past_end, EINVAL, offset, len, size))
                        .and_then(|()| {
                            let mut ext = Vec::new();
                            b.block_status(offset, u64::from(len), &mut ext)?;
                            Ok(descriptors(&ext, len, flags & CMD_FLAG_REQ_ONE != 0))
                        });
                    match r {
                        Ok(d) => {
                            let mut m = Msg::default().u32(META_ID_ALLOCATION);
                            for (l, f) in d {
                                m = m.u32(l).u32(f);
                            }
                            self.chunk(cookie, REPLY_TYPE_BLOCK_STATUS, &m.0)?;
                        }
                        Err(f) => self.error_reply(&s, cookie, f)?,
                    }
                    continue;
                }
                other => Err(fail(EINVAL, format!("unknown command {other}"))),
            };
            match result {
                Ok(()) => self.simple(cookie, 0)?,
                Err(f) => self.error_reply(&s, cookie, f)?,
            }
        }
    }

    fn simple(&mut self, cookie: u64, error: u32) -> io::Result<()> {
        let m = Msg::default()
            .u32(SIMPLE_REPLY_MAGIC)
            .u32(error)
            .u64(cookie);
        self.out.write_all(&m.0)
    }

    /// A final structured reply chunk.
    fn chunk(&mut self, cookie: u64, kind: u16, payload: &[u8]) -> io::Result<()> {
        let m = Msg::default()
            .u32(STRUCTURED_REPLY_MAGIC)
            .u16(REPLY_FLAG_DONE)
            .u16(kind)
            .u64(cookie)
            .u32(payload.len() as u32);
        self.out.write_all(&m.0)?;
        self.out.write_all(payload)
    }

    fn error_reply(&mut self, s: &Session, cookie: u64, f: Fail) -> io::Result<()> {
        if !s.structured {
            return self.simple(cookie, f.code);
        }
        let mut msg = f.msg.as_bytes();
        if msg.len() > MAX_STRING {
            msg = &msg[..MAX_STRING];
        }
        let m = Msg::default().u32(f.code).u16(msg.len() as u16).bytes(msg);
        self.chunk(cookie, REPLY_TYPE_ERROR, &m.0)
    }

    fn read_reply(&mut self, s: &Session, cookie: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        if !s.structured {
            self.simple(cookie, 0)?;
            return self.out.write_all(data);
        }
        if data.is_empty() {
            return self.chunk(cookie, REPLY_TYPE_NONE, &[]);
        }
        let m = Msg::default()
            .u32(STRUCTURED_REPLY_MAGIC)
            .u16(REPLY_FLAG_DONE)
            .u16(REPLY_TYPE_OFFSET_DATA)
            .u64(cookie)
            .u32(data.len() as u32 + 8)
            .u64(offset);
        self.out.write_all(&m.0)?;
        self.out.write_all(data)
    }
}

fn check_flags(flags: u16, allowed: u16) -> Result<(), Fail> {
    if flags & !allowed != 0 {
        return Err(fail(
            EINVAL,
            format!(
                "command flags {:#x} are not valid for this command",
                flags & !allowed
            ),
        ));
    }
    Ok(())
}

fn writable(read_only: bool) -> Result<(), Fail> {
    if read_only {
        return Err(fail(EPERM, "this export is read-only"));
    }
    Ok(())
}

fn in_bounds(past_end: bool, code: u32, offset: u64, len: u32, size: u64) -> Result<(), Fail> {
    if past_end {
        return Err(fail(
            code,
            format!("{len} bytes at offset {offset} go past the end of the export ({size} bytes)"),
        ));
    }
    Ok(())
}

/// Block status descriptors (length, `base:allocation` flags) for a request of `len` bytes:
/// adjacent extents with the same flags merged, at most `len` bytes and [`MAX_EXTENTS`]
/// descriptors (one with `req_one`), never empty.
fn descriptors(ext: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for e in ext {
        if left == 0 {
            break;
        }
        let n = e.len.min(u64::from(left)) as u32;
        if n == 0 {
            continue;
        }
        let f = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        left -= n;
        match out.last_mut() {
            Some(last) if last.1 == f => last.0 += n,
            _ => {
                if out.len() == MAX_EXTENTS {
                    break;
                }
                out.push((n, f));
            }
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests;
