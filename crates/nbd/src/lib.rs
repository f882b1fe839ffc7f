//! # pagesnap-nbd
//!
//! A Network Block Device server, written from the protocol's specification (`doc/proto.md` of
//! the NetworkBlockDevice project), generic over what it serves: anything that implements
//! [`Backend`] (read, write, flush, trim, write zeroes, block status). `pagesnap serve` uses it
//! to serve a raw image with every write tracked, and a stored snapshot read-only.
//!
//! What is implemented (see `docs/nbd.md` for the full list and what is not):
//!
//! - **Handshake**: fixed newstyle only (`NBD_FLAG_FIXED_NEWSTYLE`, `NBD_FLAG_NO_ZEROES`);
//!   options `NBD_OPT_GO`, `NBD_OPT_INFO` (with `NBD_INFO_EXPORT`, `NBD_INFO_NAME`,
//!   `NBD_INFO_DESCRIPTION`, `NBD_INFO_BLOCK_SIZE`), `NBD_OPT_LIST`, `NBD_OPT_ABORT`,
//!   `NBD_OPT_EXPORT_NAME` (the fallback), `NBD_OPT_STRUCTURED_REPLY`,
//!   `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` with `base:allocation`. Any
//!   other option (`NBD_OPT_STARTTLS`, `NBD_OPT_EXTENDED_HEADERS`, …) has its data skipped and
//!   is answered `NBD_REP_ERR_UNSUP`; the session stays in sync.
//! - **Transmission**: `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (with
//!   `NO_HOLE`), `BLOCK_STATUS` (with `REQ_ONE`), `CACHE` (a no-op), `DISC`; simple replies, and
//!   structured replies once negotiated (errors then carry a message).
//! - **Sizes**: minimum block 1, preferred 4096, maximum payload 32 MiB (the defaults, sent as
//!   `NBD_INFO_BLOCK_SIZE` when asked). A write's payload is read whole before anything is
//!   applied, so a client that disconnects in the middle of one changes nothing; a payload over
//!   the maximum is read and dropped (`EINVAL`), keeping the stream in sync. Requests past the
//!   export's end get `ENOSPC` (writes, write zeroes) or `EINVAL` (the rest); writes to a
//!   read-only export get `EPERM`.
//! - **Connections**: one thread each, up to [`Limits::connections`] (64) at once — one more is
//!   closed without a greeting, and the server logs ([`Server::set_log`]) when it starts and
//!   stops refusing; a connection must finish option haggling within [`Limits::handshake`]
//!   (30 s), so silent connections cannot hold every slot. [`Export::multi_conn`] advertises
//!   `NBD_FLAG_CAN_MULTI_CONN` (set it only if the backend's flush is global).
//! - **Shutdown**: [`ShutdownHandle::shutdown`] stops accepting (the accept loop polls the
//!   listener, so nothing has to reach the socket's path), lets each connection finish the
//!   request it is in, answers requests already sent with `NBD_ESHUTDOWN`, and closes; a
//!   connection still in a request, or whose client does not read its replies, is dropped after
//!   [`Limits::drain`] (5 s: socket writes time out every poll period and are retried until
//!   then). [`Server::serve`] returns when every connection has ended.
//!
//! ```no_run
//! use pagesnap_nbd::{Backend, Export, Extent, Listener, Server};
//! use std::io;
//! use std::sync::Mutex;
//!
//! struct Ram(Mutex<Vec<u8>>);
//! impl Backend for Ram {
//!     fn size(&self) -> u64 { 1 << 20 }
//!     fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
//!         let d = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
//!         buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
//!         Ok(())
//!     }
//!     fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
//!         let mut d = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
//!         d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//!     fn flush(&self) -> io::Result<()> { Ok(()) }
//!     fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> { Ok(()) }
//!     fn write_zeroes(&self, offset: u64, len: u64, _punch: bool, fua: bool) -> io::Result<()> {
//!         self.write(offset, &vec![0; len as usize], fua)
//!     }
//!     fn block_status(&self, _: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
//!         out.push(Extent { len, hole: false, zero: false });
//!         Ok(())
//!     }
//! }
//!
//! let server = Server::new(Ram(Mutex::new(vec![0; 1 << 20])), Export::new("ram"));
//! let listener = Listener::bind_unix("/tmp/ram.sock".as_ref())?;
//! server.serve(listener)?;
//! # Ok::<(), io::Error>(())
//! ```

mod proto;
mod server;

pub use server::{wait_readable, Limits, Listener, Server, ShutdownHandle, Transport};

use std::io;

/// The largest payload of one request or reply: 32 MiB (`NBD_INFO_BLOCK_SIZE`'s maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The preferred block size advertised: 4096.
pub const PREFERRED_BLOCK: u32 = 4096;

/// What an NBD export is backed by. Every method may be called from several connections at
/// once. Offsets and lengths are checked by the server first: they lie within [`Backend::size`],
/// lengths are non-zero, and `read`/`write` buffers are at most [`MAX_PAYLOAD`] bytes.
///
/// Errors are `io::Error`s; the client sees the matching NBD error (`EPERM` for permission or a
/// read-only file system, `ENOSPC` for a full disk, quota or file size limit, `EINVAL`,
/// `ENOMEM`, `EOVERFLOW`, `ENOTSUP`, else `EIO`) and, with structured replies, the error's text.
pub trait Backend: Send + Sync {
    /// The export's size in bytes (fixed while the server runs).
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`; with `fua`, durably before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Makes every write completed so far durable.
    fn flush(&self) -> io::Result<()>;
    /// The client no longer needs `len` bytes at `offset` (their content is then undefined).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Zeroes `len` bytes at `offset`; `may_punch` false (`NBD_CMD_FLAG_NO_HOLE`) means the
    /// range must stay allocated.
    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, fua: bool) -> io::Result<()>;
    /// Appends to `out` the extents from `offset` on, consecutive, covering at least one byte
    /// and preferably `len` bytes (more or fewer is fine: the server trims the list).
    fn block_status(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()>;
}

/// One run of bytes with the same allocation state (`base:allocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Its length in bytes.
    pub len: u64,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// How an export is presented to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// Its name. Clients may also ask for the default export (the empty name), which is this one.
    pub name: String,
    /// A line for humans (`NBD_OPT_LIST`, `NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Writes, trims and write zeroes get `EPERM`; `NBD_FLAG_READ_ONLY` is advertised.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: a flush on one connection covers writes completed
    /// on every connection.
    pub multi_conn: bool,
}

impl Export {
    /// A writable export named `name`, one connection at a time advertised.
    pub fn new(name: impl Into<String>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            read_only: false,
            multi_conn: false,
        }
    }
}
