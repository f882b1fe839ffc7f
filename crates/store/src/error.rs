//! Typed errors of the store. Each names the file and the step, and says what to do.

use crate::SnapshotId;
use std::io;
use std::path::PathBuf;

fn io_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(28) => " (the disk is full: free space and retry; nothing committed was changed)",
        Some(5) => " (an I/O error from the device: check the disk; nothing committed was changed)",
        Some(13) | Some(1) => " (permission denied: check the store directory's owner and mode)",
        _ if e.kind() == io::ErrorKind::NotFound => {
            " (missing: is this the right store directory?)"
        }
        _ => "",
    }
}

/// Errors of the snapshot store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("{}: {step} failed: {source}{}", .path.display(), io_hint(.source))]
    Io {
        /// The file (or directory) involved.
        path: PathBuf,
        /// The step that failed, e.g. "sync segment".
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a record failed (the device returned an error).
    #[error("{}: reading the {what} of {len} bytes at offset {offset} failed: {source}{}", .path.display(), io_hint(.source))]
    Read {
        /// The segment file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No valid superblock: not a store (or not initialised).
    #[error("{} is not a pagesnap store (no superblock); create one with `pagesnap init`", .path.display())]
    NotAStore {
        /// The directory.
        path: PathBuf,
    },
    /// `init` on a directory that already holds a store.
    #[error("{} already holds a pagesnap store; use it, or choose an empty directory", .path.display())]
    AlreadyExists {
        /// The directory.
        path: PathBuf,
    },
    /// Written by a newer pagesnap.
    #[error("{} was written by store format {found}, newer than this pagesnap reads ({supported}); upgrade pagesnap", .path.display())]
    NewerVersion {
        /// The directory.
        path: PathBuf,
        /// The format found.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// Encrypted with a scheme this build does not know.
    #[error("{} is encrypted with scheme {scheme}, which this pagesnap does not know: use a newer pagesnap (nothing was read or changed)", .path.display())]
    UnknownEncryption {
        /// The directory.
        path: PathBuf,
        /// The scheme byte found.
        scheme: u8,
    },
    /// Another writer holds the store.
    #[error("{} is locked by another writer ({holder}); wait for it to finish", .path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
        /// Who holds it, as it wrote in the lock file.
        holder: String,
    },
    /// Bytes on disk fail their checks.
    #[error("{}: damaged {what} at offset {offset}: {detail}; run `pagesnap verify` to see what is affected", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// No such snapshot.
    #[error("no snapshot {0} in this store; `pagesnap list` shows the snapshots")]
    UnknownSnapshot(SnapshotId),
    /// A change was asked of a store opened for reading.
    #[error("the store is open read-only; open it as the writer to change it")]
    ReadOnly,
    /// A page of the wrong size.
    #[error("a page of {len} bytes was given; this store's pages are {page_size} bytes")]
    PageSize {
        /// Bytes given.
        len: usize,
        /// The store's page size.
        page_size: u32,
    },
    /// `put`, `remove` or `commit` without `begin`, or `begin` twice.
    #[error("{0}")]
    Usage(&'static str),
    /// The compressor could not be started or stopped working (nothing was committed).
    #[error("compression: {0}")]
    Compression(String),
    /// A superblock write failed and could not be undone.
    #[error("{}: a commit failed half-way and could not be undone, so which state is on disk is unknown; close and reopen the store (it recovers to the last durable commit)", .path.display())]
    InDoubt {
        /// The directory.
        path: PathBuf,
    },
    /// `delete` of a snapshot that is pinned (see [`crate::Store::pin`]).
    #[error("snapshot {0} is in use (the parent of the next snapshot or the source of a lazy restore) and cannot be deleted while it is; delete it after the space using it is closed")]
    Pinned(SnapshotId),
    /// The superblock cannot list more segments.
    #[error(
        "the store has {count} segment files, more than a superblock can list; run `pagesnap gc`"
    )]
    TooManySegments {
        /// Segments in use.
        count: usize,
    },
    /// No key slot opens with the password given.
    #[error("wrong password: no key slot of {} opens with it (nothing was changed)", .path.display())]
    WrongPassword {
        /// The key file.
        path: PathBuf,
    },
    /// No password was given, and there is no terminal to ask on.
    #[error("no {} given: set {} or {} (or use {}), or run on a terminal to be asked", .role.what(), .role.env(), .role.file_env(), .role.file_flag())]
    NoPassword {
        /// Which password.
        role: crate::keys::PasswordRole,
    },
    /// A password file could not be read, or holds no password.
    #[error("{what} file {}: {source}", .path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// "password" or "new password".
        what: &'static str,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The store has no key file.
    #[error("{} has no key file: the store is not encrypted", .path.display())]
    NotEncrypted {
        /// The directory.
        path: PathBuf,
    },
    /// Creating a key file where there is one.
    #[error("{} already has a key file (the store is encrypted); add a password with `pagesnap key add`", .path.display())]
    KeysExist {
        /// The directory.
        path: PathBuf,
    },
    /// The key file is of a newer format.
    #[error("{} was written by key file format {found}, newer than this pagesnap reads ({supported}); upgrade pagesnap", .path.display())]
    KeyFileVersion {
        /// The key file.
        path: PathBuf,
        /// The format found.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// Removing the only key slot.
    #[error("{}: slot {slot} is the last key slot, and without one the store cannot be opened; add another password first", .path.display())]
    LastKeySlot {
        /// The key file.
        path: PathBuf,
        /// The slot.
        slot: u32,
    },
    /// No such key slot.
    #[error("{}: no key slot {slot}; `pagesnap key list` shows the slots", .path.display())]
    UnknownKeySlot {
        /// The key file.
        path: PathBuf,
        /// The slot asked for.
        slot: u32,
    },
    /// The superblock says the store is not encrypted, but a key file is there or a password
    /// was given: refused (a downgrade would write data in clear).
    #[error("{}: the superblock says this store is not encrypted, but {}; it may have been tampered with — do not write to it (if it really is a plaintext store, {})", .path.display(), if *.keys { "a key file (keys) is there" } else { "a password was given" }, if *.keys { "remove the stray keys file" } else { "unset PAGESNAP_PASSWORD / PAGESNAP_PASSWORD_FILE and --password-file" })]
    NotEncryptedButKeyed {
        /// The store.
        path: PathBuf,
        /// A key file is there (else: a password was given).
        keys: bool,
    },
    /// Every key slot is in use.
    #[error("{}: all {max} key slots are in use; remove one first", .path.display())]
    KeySlotsFull {
        /// The key file.
        path: PathBuf,
        /// How many a key file holds.
        max: usize,
    },
    /// A master key that is not the key file's.
    #[error("{}: the master key given (id {found}) is not this store's (id {expected})", .path.display())]
    KeyMismatch {
        /// The key file.
        path: PathBuf,
        /// The given key's id.
        found: String,
        /// The key file's key id.
        expected: String,
    },
    /// A password, label or Argon2id parameter that cannot be used (the message never holds a
    /// secret).
    #[error("{0}")]
    InvalidKeyInput(String),
    /// The store is encrypted and no password was given.
    #[error("{} is encrypted: give its password (PAGESNAP_PASSWORD, PAGESNAP_PASSWORD_FILE or --password-file), or run on a terminal to be asked", .path.display())]
    Encrypted {
        /// The directory.
        path: PathBuf,
    },
    /// The store is encrypted and its key file is missing.
    #[error("{} is encrypted, but its key file `keys` is missing: nothing can be read without it; restore it from a copy of the store (the store is never treated as unencrypted)", .path.display())]
    KeyFileMissing {
        /// The directory.
        path: PathBuf,
    },
    /// The operating system's random generator failed.
    #[error("no random bytes from the operating system: {0}")]
    Random(String),
}

impl StoreError {
    /// True if this is corruption (verify should name it) rather than an I/O or usage problem.
    pub fn is_corruption(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }
}
