//! The protocol against a small client written here, byte by byte, over a socket pair.

use super::*;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;
use std::time::Instant;

const SIZE: usize = 1 << 20;

/// 1 MiB in memory; block status says "hole, zero" for each all-zero 4 KiB block.
struct Ram {
    data: Mutex<Vec<u8>>,
    reads: AtomicUsize,
    writes: AtomicUsize,
    flushes: AtomicUsize,
}

impl Ram {
    fn new() -> Ram {
        let mut data = vec![0u8; SIZE];
        for (i, b) in data[..8192].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        Ram {
            data: Mutex::new(data),
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        self.data.lock().expect("lock").clone()
    }
}

impl Backend for Ram {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().expect("lock");
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let mut d = self.data.lock().expect("lock");
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, true, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool, fua: bool) -> io::Result<()> {
        self.write(offset, &vec![0u8; len as usize], fua)
    }
    fn block_status(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let d = self.data.lock().expect("lock");
        let mut at = offset;
        while at < offset + len {
            let end = ((at / 4096 + 1) * 4096).min(SIZE as u64);
            let zero = d[at as usize..end as usize].iter().all(|&b| b == 0);
            out.push(Extent {
                len: end - at,
                hole: zero,
                zero,
            });
            at = end;
        }
        Ok(())
    }
}

struct Client {
    c: UnixStream,
    server: Arc<Server<Ram>>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

fn start(export: Export) -> Client {
    let (a, b) = UnixStream::pair().expect("pair");
    b.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let server = Arc::new(Server::new(Ram::new(), export));
    let s = server.clone();
    let thread = std::thread::spawn(move || s.handle(a));
    Client {
        c: b,
        server,
        thread: Some(thread),
    }
}

impl Client {
    fn send(&mut self, b: &[u8]) {
        self.c.write_all(b).expect("send");
    }
    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.c.read_exact(&mut b).expect("recv");
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().expect("2"))
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().expect("4"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().expect("8"))
    }
    /// Reads the greeting and answers with `flags`.
    fn greet(&mut self, flags: u32) {
        let g = self.recv(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
        self.send(&flags.to_be_bytes());
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let m = Msg::default()
            .u64(IHAVEOPT)
            .u32(opt)
            .u32(data.len() as u32)
            .bytes(data);
        self.send(&m.0);
    }
    /// One option reply: (option, reply type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (opt, kind, self.recv(len))
    }
    /// `NBD_OPT_GO` for `name` asking for the block size; returns the transmission flags.
    fn go(&mut self, name: &str) -> u16 {
        let data = Msg::default()
            .u32(name.len() as u32)
            .bytes(name.as_bytes())
            .u16(1)
            .u16(INFO_BLOCK_SIZE);
        self.option(OPT_GO, &data.0);
        let mut flags = None;
        let mut sizes = None;
        loop {
            let (opt, kind, d) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO => match u16::from_be_bytes([d[0], d[1]]) {
                    INFO_EXPORT => {
                        assert_eq!(d.len(), 12);
                        assert_eq!(
                            u64::from_be_bytes(d[2..10].try_into().expect("8")),
                            SIZE as u64
                        );
                        flags = Some(u16::from_be_bytes([d[10], d[11]]));
                    }
                    INFO_BLOCK_SIZE => {
                        let v = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4"));
                        sizes = Some((v(2), v(6), v(10)));
                    }
                    _ => {}
                },
                REP_ACK => break,
                other => panic!(
                    "GO failed: reply {other:#x}: {}",
                    String::from_utf8_lossy(&d)
                ),
            }
        }
        assert_eq!(sizes, Some((1, 4096, 32 << 20)));
        flags.expect("NBD_INFO_EXPORT")
    }
    fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.option_reply(), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
    }
    fn set_meta(&mut self, queries: &[&str]) -> Vec<(u32, String)> {
        let mut m = Msg::default().u32(0).u32(queries.len() as u32);
        for q in queries {
            m = m.u32(q.len() as u32).bytes(q.as_bytes());
        }
        self.option(OPT_SET_META_CONTEXT, &m.0);
        let mut got = Vec::new();
        loop {
            let (_, kind, d) = self.option_reply();
            match kind {
                REP_META_CONTEXT => got.push((
                    u32::from_be_bytes(d[..4].try_into().expect("4")),
                    String::from_utf8(d[4..].to_vec()).expect("utf-8"),
                )),
                REP_ACK => return got,
                other => panic!("SET_META_CONTEXT: {other:#x}"),
            }
        }
    }
    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let m = Msg::default()
            .u32(REQUEST_MAGIC)
            .u16(flags)
            .u16(kind)
            .u64(cookie)
            .u64(offset)
            .u32(len)
            .bytes(payload);
        self.send(&m.0);
    }
    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }
    /// One structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
        let flags = self.u16();
        let kind = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        (flags, kind, cookie, self.recv(len))
    }
    /// Ends the session and waits for the server's side.
    fn finish(mut self) -> io::Result<()> {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
        self.thread.take().expect("thread").join().expect("join")
    }
    fn transmission(export: Export) -> Client {
        let mut c = start(export);
        c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c.structured();
        assert_eq!(
            c.set_meta(&["base:allocation"]),
            vec![(1, "base:allocation".into())]
        );
        c.go("");
        c
    }
}

fn error_code(payload: &[u8]) -> u32 {
    u32::from_be_bytes(payload[..4].try_into().expect("4"))
}

#[test]
fn the_greeting_is_fixed_newstyle_and_unknown_client_flags_end_it() {
    let mut c = start(Export::new("disk"));
    c.greet(1 << 5);
    let end = c.thread.take().expect("thread").join().expect("join");
    assert!(end.is_err(), "unknown client flags are a protocol error");
    let mut rest = Vec::new();
    c.c.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty(), "nothing more was sent: {rest:?}");
}

#[test]
fn unknown_options_get_err_unsup_and_the_session_stays_in_sync() {
    let mut c = start(Export::new("disk"));
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    // NBD_OPT_EXTENDED_HEADERS (qemu 10 asks first), STARTTLS, and a made-up one with data.
    for (opt, data) in [(11u32, vec![]), (5, vec![]), (0xdead, vec![7u8; 1000])] {
        c.option(opt, &data);
        let (o, kind, msg) = c.option_reply();
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
        assert!(!msg.is_empty(), "a message for humans");
    }
    // Oversized option data is skipped without losing sync.
    c.option(0xbeef, &vec![1u8; (MAX_OPTION_DATA + 10) as usize]);
    assert_eq!(c.option_reply().1, REP_ERR_TOO_BIG);
    // Structured replies before meta contexts; meta contexts before structured replies fail.
    c.option(OPT_SET_META_CONTEXT, &Msg::default().u32(0).u32(0).0);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.structured();
    // LIST_META_CONTEXT with no query lists base:allocation; SET ignores other namespaces.
    c.option(OPT_LIST_META_CONTEXT, &Msg::default().u32(0).u32(0).0);
    let (_, kind, d) = c.option_reply();
    assert_eq!(
        (kind, &d[4..]),
        (REP_META_CONTEXT, "base:allocation".as_bytes())
    );
    assert_eq!(c.option_reply().1, REP_ACK);
    assert_eq!(c.set_meta(&["qemu:dirty-bitmap:x", "base:"]), vec![]);
    assert_eq!(c.set_meta(&["base:allocation"]).len(), 1);
    // An unknown export name: NBD_REP_ERR_UNKNOWN, and the client may try again.
    c.option(OPT_GO, &Msg::default().u32(4).bytes(b"nope").u16(0).0);
    let (_, kind, msg) = c.option_reply();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(
        String::from_utf8_lossy(&msg).contains("disk"),
        "names the export"
    );
    // A malformed GO (name length past the data).
    c.option(OPT_GO, &Msg::default().u32(100).u16(0).0);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    // LIST names the export.
    c.option(OPT_LIST, &[]);
    let (_, kind, d) = c.option_reply();
    assert_eq!(
        (kind, &d[..8]),
        (REP_SERVER, &[0, 0, 0, 4, b'd', b'i', b's', b'k'][..])
    );
    assert_eq!(c.option_reply().1, REP_ACK);
    let flags = c.go("disk");
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    assert_ne!(flags & FLAG_SEND_DF, 0, "DF once structured replies are on");
    // In transmission: a structured read of the first bytes.
    c.request(0, CMD_READ, 42, 10, 20, &[]);
    let (f, kind, cookie, d) = c.chunk();
    assert_eq!(
        (f, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 42)
    );
    assert_eq!(u64::from_be_bytes(d[..8].try_into().expect("8")), 10);
    assert_eq!(d[8..], c.server.backend().bytes()[10..30]);
    c.finish().expect("clean end");
}

#[test]
fn export_name_fallback_sends_size_flags_and_the_zeroes_unless_declined() {
    for no_zeroes in [false, true] {
        let mut c = start(Export::new("disk"));
        c.greet(FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 });
        c.option(OPT_EXPORT_NAME, b"disk");
        assert_eq!(c.u64(), SIZE as u64);
        let flags = c.u16();
        assert_eq!(flags & FLAG_SEND_DF, 0, "no DF without structured replies");
        assert_ne!(flags & FLAG_SEND_FLUSH, 0);
        if !no_zeroes {
            assert_eq!(c.recv(124), vec![0u8; 124]);
        }
        // Simple replies: a read is a header then the data.
        c.request(0, CMD_READ, 7, 0, 16, &[]);
        assert_eq!(c.simple(), (0, 7));
        assert_eq!(c.recv(16), c.server.backend().bytes()[..16]);
        c.finish().expect("clean end");
    }
    // An unknown name cannot be refused politely with this option: the server disconnects.
    let mut c = start(Export::new("disk"));
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"other");
    assert!(c
        .thread
        .take()
        .expect("thread")
        .join()
        .expect("join")
        .is_err());
}

#[test]
fn abort_is_acknowledged() {
    let mut c = start(Export::new("disk"));
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply(), (OPT_ABORT, REP_ACK, vec![]));
    c.thread
        .take()
        .expect("thread")
        .join()
        .expect("join")
        .expect("clean");
}

#[test]
fn writes_flush_trim_zeroes_and_block_status() {
    let mut c = Client::transmission(Export::new("disk"));
    // An unaligned write with FUA.
    c.request(CMD_FLAG_FUA, CMD_WRITE, 1, 9000, 3, b"abc");
    assert_eq!(c.simple(), (0, 1));
    assert_eq!(&c.server.backend().bytes()[9000..9003], b"abc");
    c.request(0, CMD_FLUSH, 2, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.server.backend().flushes.load(Ordering::SeqCst), 1);
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 0, 100, &[]);
    assert_eq!(c.simple(), (0, 3));
    assert_eq!(c.server.backend().bytes()[..100], [0u8; 100]);
    c.request(0, CMD_TRIM, 4, 4096, 4096, &[]);
    assert_eq!(c.simple(), (0, 4));
    // Block status: block 0 has data, block 1 was trimmed, block 2 holds the write, the rest
    // is zero.
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 5 * 4096, &[]);
    let (f, kind, cookie, d) = c.chunk();
    assert_eq!(
        (f, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 5)
    );
    let words: Vec<u32> = d
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().expect("4")))
        .collect();
    assert_eq!(words, vec![1, 4096, 0, 4096, 3, 4096, 0, 2 * 4096, 3]);
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 6, 4096, 100, &[]);
    let (_, _, _, d) = c.chunk();
    assert_eq!(d.len(), 12, "one descriptor");
    assert_eq!(
        u32::from_be_bytes(d[4..8].try_into().expect("4")),
        100,
        "within the request"
    );
    c.finish().expect("clean end");
}

#[test]
fn requests_past_the_end_get_enospc_for_writes_and_einval_otherwise() {
    let mut c = Client::transmission(Export::new("disk"));
    let end = SIZE as u64;
    c.request(0, CMD_WRITE, 1, end - 2, 4, b"wxyz");
    let (_, kind, cookie, d) = c.chunk();
    assert_eq!(
        (kind, cookie, error_code(&d)),
        (REPLY_TYPE_ERROR, 1, ENOSPC)
    );
    c.request(0, CMD_WRITE_ZEROES, 2, end, 1, &[]);
    assert_eq!(error_code(&c.chunk().3), ENOSPC);
    for (i, kind) in [CMD_READ, CMD_TRIM, CMD_BLOCK_STATUS, CMD_CACHE]
        .into_iter()
        .enumerate()
    {
        c.request(0, kind, 10 + i as u64, end - 1, 2, &[]);
        let (f, t, cookie, d) = c.chunk();
        assert_eq!(
            (f, t, cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 10 + i as u64)
        );
        assert_eq!(error_code(&d), EINVAL, "command {kind}");
    }
    // An offset whose end overflows 64 bits.
    c.request(0, CMD_READ, 20, u64::MAX, 2, &[]);
    assert_eq!(error_code(&c.chunk().3), EINVAL);
    // Unknown command and flags.
    c.request(0, 99, 21, 0, 0, &[]);
    assert_eq!(error_code(&c.chunk().3), EINVAL);
    c.request(CMD_FLAG_REQ_ONE, CMD_WRITE, 22, 0, 1, b"q");
    assert_eq!(error_code(&c.chunk().3), EINVAL);
    assert_eq!(
        c.server.backend().writes.load(Ordering::SeqCst),
        0,
        "nothing written"
    );
    assert_eq!(c.server.backend().bytes(), Ram::new().bytes());
    c.finish().expect("clean end");
}

#[test]
fn an_oversize_write_is_read_and_refused_and_the_stream_stays_in_sync() {
    let mut c = Client::transmission(Export::new("disk"));
    let len = MAX_PAYLOAD + 4096;
    let big = vec![0xEEu8; len as usize];
    let writer = {
        let mut w = c.c.try_clone().expect("clone");
        std::thread::spawn(move || {
            let m = Msg::default()
                .u32(REQUEST_MAGIC)
                .u16(0)
                .u16(CMD_WRITE)
                .u64(1)
                .u64(0)
                .u32(len);
            w.write_all(&m.0).and_then(|()| w.write_all(&big))
        })
    };
    let (_, kind, cookie, d) = c.chunk();
    writer.join().expect("join").expect("sent");
    assert_eq!(
        (kind, cookie, error_code(&d)),
        (REPLY_TYPE_ERROR, 1, EINVAL)
    );
    // A read of more than the maximum: EOVERFLOW with structured replies.
    c.request(0, CMD_READ, 2, 0, MAX_PAYLOAD + 1, &[]);
    assert_eq!(error_code(&c.chunk().3), EOVERFLOW);
    c.request(0, CMD_READ, 3, 0, 4, &[]);
    let (_, kind, cookie, d) = c.chunk();
    assert_eq!((kind, cookie), (REPLY_TYPE_OFFSET_DATA, 3));
    assert_eq!(d[8..], Ram::new().bytes()[..4]);
    assert_eq!(c.server.backend().writes.load(Ordering::SeqCst), 0);
    c.finish().expect("clean end");
}

#[test]
fn a_client_that_disconnects_in_the_middle_of_a_write_changes_nothing() {
    let mut c = Client::transmission(Export::new("disk"));
    let m = Msg::default()
        .u32(REQUEST_MAGIC)
        .u16(0)
        .u16(CMD_WRITE)
        .u64(1)
        .u64(0)
        .u32(65536)
        .bytes(&[0x55u8; 65000]);
    c.send(&m.0);
    c.c.shutdown(std::net::Shutdown::Write).expect("half close");
    let end = c.thread.take().expect("thread").join().expect("join");
    assert!(end.is_err(), "the stream ended inside a request");
    assert_eq!(c.server.backend().writes.load(Ordering::SeqCst), 0);
    assert_eq!(c.server.backend().bytes(), Ram::new().bytes());
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let mut e = Export::new("snap");
    e.read_only = true;
    let mut c = start(e);
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.structured();
    let flags = c.go("snap");
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    c.request(0, CMD_WRITE, 1, 0, 2, b"hi");
    assert_eq!(error_code(&c.chunk().3), EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(error_code(&c.chunk().3), EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(error_code(&c.chunk().3), EPERM);
    // No context selected: block status is refused.
    c.request(0, CMD_BLOCK_STATUS, 4, 0, 4096, &[]);
    assert_eq!(error_code(&c.chunk().3), EINVAL);
    assert_eq!(c.server.backend().bytes(), Ram::new().bytes());
    c.finish().expect("clean end");
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let mut c = Client::transmission(Export::new("disk"));
    let mut m = Msg::default();
    for i in 0..100u64 {
        m = m
            .u32(REQUEST_MAGIC)
            .u16(0)
            .u16(CMD_WRITE)
            .u64(i)
            .u64(i * 4096)
            .u32(8)
            .bytes(&i.to_le_bytes());
    }
    c.send(&m.0);
    for i in 0..100u64 {
        assert_eq!(c.simple(), (0, i));
    }
    let d = c.server.backend().bytes();
    for i in 0..100usize {
        assert_eq!(d[i * 4096..i * 4096 + 8], (i as u64).to_le_bytes());
    }
    c.finish().expect("clean end");
}

#[test]
fn shutdown_ends_serve_and_answers_later_requests_with_eshutdown() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sock");
    let server = Arc::new(Server::new(Ram::new(), Export::new("disk")));
    let listener = Listener::bind_unix(&path).expect("bind");
    let s = server.clone();
    let serving = std::thread::spawn(move || s.serve(listener));
    let stream = UnixStream::connect(&path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut c = Client {
        c: stream,
        server: server.clone(),
        thread: None,
    };
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.structured();
    c.go("");
    c.request(0, CMD_WRITE, 1, 0, 1, b"z");
    assert_eq!(c.simple(), (0, 1));
    server.shutdown_handle().shutdown();
    // A request already on its way is answered with ESHUTDOWN (or the connection is closed
    // once idle): never applied.
    c.request(0, CMD_WRITE, 2, 1, 1, b"y");
    let mut first = [0u8; 4];
    if c.c.read_exact(&mut first).is_ok() {
        assert_eq!(u32::from_be_bytes(first), STRUCTURED_REPLY_MAGIC);
        let rest = c.recv(16);
        let len = u32::from_be_bytes(rest[12..16].try_into().expect("4")) as usize;
        assert_eq!(error_code(&c.recv(len)), ESHUTDOWN);
    }
    serving.join().expect("join").expect("serve ended cleanly");
    assert_eq!(&server.backend().bytes()[..2], &[b'z', 2]);
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_is_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists(), "a socket file left behind");
    let live = Listener::bind_unix(&path).expect("stale socket replaced");
    let again = Listener::bind_unix(&path).expect_err("in use");
    assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
    drop(live);
    std::fs::write(&path, b"not a socket").expect("write");
    assert!(
        Listener::bind_unix(&path).is_err(),
        "a regular file is left alone"
    );
}

#[test]
fn descriptors_merge_clamp_and_never_come_back_empty() {
    let e = |len, hole| Extent {
        len,
        hole,
        zero: hole,
    };
    assert_eq!(
        descriptors(&[e(10, false), e(5, false), e(100, true)], 50, false),
        vec![(15, 0), (35, 3)]
    );
    assert_eq!(
        descriptors(&[e(10, true), e(10, false)], 50, true),
        vec![(10, 3)]
    );
    assert_eq!(descriptors(&[], 7, false), vec![(7, 0)]);
    assert_eq!(
        descriptors(&[e(u64::MAX, true)], u32::MAX, false),
        vec![(u32::MAX, 3)]
    );
}

/// Serves `server` on a Unix socket at `path` in a thread; its result arrives on the channel.
fn serve_in_thread(
    server: &Arc<Server<Ram>>,
    path: &Path,
) -> std::sync::mpsc::Receiver<io::Result<()>> {
    let listener = Listener::bind_unix(path).expect("bind");
    let (tx, rx) = std::sync::mpsc::channel();
    let s = server.clone();
    std::thread::spawn(move || {
        let _ = tx.send(s.serve(listener));
    });
    rx
}

/// Waits (bounded) until `cond` holds.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client on `path`, in transmission with structured replies.
fn connect(server: &Arc<Server<Ram>>, path: &Path) -> Client {
    let stream = UnixStream::connect(path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut c = Client {
        c: stream,
        server: server.clone(),
        thread: None,
    };
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.structured();
    c.go("");
    c
}

#[test]
fn review_shutdown_completes_while_a_client_does_not_read_its_replies() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sock");
    let limits = Limits {
        drain: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = Arc::new(Server::with_limits(Ram::new(), Export::new("disk"), limits));
    let done = serve_in_thread(&server, &path);
    let mut c = connect(&server, &path);
    // 64 MiB of replies asked for and none read: the server's writes block once the socket's
    // buffers are full (a few hundred KiB).
    for i in 0..64 {
        c.request(0, CMD_READ, i, 0, SIZE as u32, &[]);
    }
    wait_until("the first read", || {
        server.backend().reads.load(Ordering::SeqCst) >= 1
    });
    server.shutdown_handle().shutdown();
    let ended = done.recv_timeout(limits.drain + Duration::from_secs(10));
    assert!(
        matches!(ended, Ok(Ok(()))),
        "serve did not return within the drain period and 10 s more: {ended:?}"
    );
    drop(c);
}

#[test]
fn review_shutdown_ends_serve_when_the_socket_file_was_removed() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sock");
    let server = Arc::new(Server::new(Ram::new(), Export::new("disk")));
    let done = serve_in_thread(&server, &path);
    // Serving: a client gets through.
    let mut c = connect(&server, &path);
    c.request(0, CMD_READ, 1, 0, 4, &[]);
    assert_eq!(c.chunk().1, REPLY_TYPE_OFFSET_DATA);
    drop(c);
    std::fs::remove_file(&path).expect("remove the socket file");
    server.shutdown_handle().shutdown();
    let ended = done.recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(ended, Ok(Ok(()))),
        "serve did not return within 10 s of the shutdown: {ended:?}"
    );
}

#[test]
fn review_silent_connections_are_dropped_after_the_handshake_limit_and_refusals_are_logged() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sock");
    let limits = Limits {
        connections: 2,
        handshake: Duration::from_millis(500),
        ..Limits::default()
    };
    let mut server = Server::with_limits(Ram::new(), Export::new("disk"), limits);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    server.set_log(move |m| l.lock().expect("log").push(m.to_string()));
    let server = Arc::new(server);
    let done = serve_in_thread(&server, &path);
    let logged = |words: &str| log.lock().expect("log").iter().any(|m| m.contains(words));
    // Two connections that say nothing fill the server (each got its greeting: admitted).
    let silent: Vec<UnixStream> = (0..2)
        .map(|_| {
            let mut c = UnixStream::connect(&path).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut greeting = [0u8; 18];
            c.read_exact(&mut greeting).expect("greeting");
            c
        })
        .collect();
    // A third is closed without a greeting, and the server says why.
    let mut third = UnixStream::connect(&path).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    third.read_to_end(&mut got).expect("closed");
    assert!(got.is_empty(), "no greeting past the limit");
    assert!(
        logged("2 connections are open"),
        "{:?}",
        log.lock().expect("log")
    );
    // The silent ones are dropped once the handshake limit is over.
    for mut c in silent {
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("dropped, not left waiting");
        assert!(rest.is_empty());
    }
    wait_until("the slots to free", || {
        server.shared.connections.load(Ordering::SeqCst) == 0
    });
    // A client gets through again, and the server says it accepts again.
    let mut c = connect(&server, &path);
    c.request(0, CMD_READ, 1, 0, 4, &[]);
    assert_eq!(c.chunk().1, REPLY_TYPE_OFFSET_DATA);
    assert!(
        logged("accepting connections again (1 closed"),
        "{:?}",
        log.lock().expect("log")
    );
    // In transmission, an idle client is not dropped: past the handshake limit it still works.
    std::thread::sleep(limits.handshake * 2); // the scenario: idle for longer than the limit
    c.request(0, CMD_READ, 2, 0, 4, &[]);
    assert_eq!(c.chunk().1, REPLY_TYPE_OFFSET_DATA);
    drop(c);
    server.shutdown_handle().shutdown();
    assert!(matches!(
        done.recv_timeout(Duration::from_secs(10)),
        Ok(Ok(()))
    ));
}

#[test]
fn wait_readable_sees_a_waiting_connection_and_times_out_without_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("w.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let started = Instant::now();
    assert!(!wait_readable(l.as_fd(), Duration::from_millis(50)).expect("poll"));
    assert!(started.elapsed() >= Duration::from_millis(50), "it waited");
    let _c = UnixStream::connect(&path).expect("connect");
    assert!(wait_readable(l.as_fd(), Duration::from_secs(10)).expect("poll"));
}
