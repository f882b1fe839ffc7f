//! Where `restore` writes, and how.
//!
//! OUTPUT is resolved through symbolic links first (the link is never replaced; a dangling link's
//! target is created). Then, by what is there:
//!
//! * nothing: a new file, built sparse in a temporary file beside it, fsynced, renamed into place
//!   and the directory fsynced;
//! * a regular file (`--force`): replaced the same atomic way, the temporary file first given the
//!   original's owner and mode (fchown, fchmod). When the owner cannot be kept (not root), a
//!   warning says so and the restore goes on with the caller as owner; the group is kept when the
//!   caller may, and the mode is always kept;
//! * a block or character device (`--force`): written in place — opened without creation or
//!   truncation, every page written including zero pages (the device holds old data), contiguous
//!   pages coalesced into writes of up to 4 MiB, then fsynced. The device must be at least the
//!   image's size; bytes past the image are left as they are. The node is never replaced;
//! * a directory, FIFO or socket: refused.

use anyhow::{anyhow, bail, Context, Result};
use pagesnap_engine::image::for_each_page_batch;
use pagesnap_store::{SnapshotId, Store};
use std::fs::{File, Metadata, OpenOptions, Permissions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Symbolic links followed before giving up (Linux's limit).
const MAX_LINKS: usize = 40;

/// What is at the (resolved) output, and so how it is written.
#[derive(Debug)]
pub enum Target {
    /// Nothing: a new file.
    New,
    /// A regular file, replaced atomically keeping its owner and mode.
    Replace(Metadata),
    /// A block (`true`) or character device, written in place.
    Device { block: bool },
}

/// Where and how a restore writes.
#[derive(Debug)]
pub struct Plan {
    /// The file written: OUTPUT with symbolic links resolved.
    pub path: PathBuf,
    /// What is there.
    pub target: Target,
}

/// What a restore wrote.
#[derive(Debug)]
pub struct Written {
    /// The image's size in bytes.
    pub image_size: u64,
    /// Non-zero pages written.
    pub pages: u64,
    /// Wall time.
    pub seconds: f64,
}

/// `output` with symbolic links followed, even to a target that does not exist, and what is
/// there (`None`: nothing).
fn resolve_links(output: &Path) -> Result<(PathBuf, Option<Metadata>)> {
    let mut path = output.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&path)
                    .with_context(|| format!("reading the symbolic link {}", path.display()))?;
                path = match path.parent() {
                    Some(dir) => dir.join(to),
                    None => to,
                };
            }
            Ok(m) => return Ok((path, Some(m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((path, None)),
            Err(e) => {
                return Err(e).with_context(|| format!("output {}", path.display()));
            }
        }
    }
    bail!(
        "{}: more than {MAX_LINKS} levels of symbolic links; name the file to restore into",
        output.display()
    )
}

/// `output` as the user named it, and where it leads when that differs.
fn named(output: &Path, path: &Path) -> String {
    if output == path {
        output.display().to_string()
    } else {
        format!("{} (-> {})", output.display(), path.display())
    }
}

/// Decides where and how to restore to `output`, refusing what must not be written: a place
/// inside the store `store_dir`, a directory, a FIFO or socket, and an existing file or device
/// without `force`.
pub fn plan(output: &Path, store_dir: Option<&Path>, force: bool) -> Result<Plan> {
    let (path, meta) = resolve_links(output)?;
    let shown = named(output, &path);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir
        .canonicalize()
        .with_context(|| format!("output directory {}", dir.display()))?;
    if let Some(store_dir) = store_dir {
        let store = store_dir
            .canonicalize()
            .with_context(|| format!("store {}", store_dir.display()))?;
        if dir.starts_with(&store) {
            bail!(
                "{shown} is inside the store {}; restore somewhere else",
                store_dir.display()
            );
        }
    }
    let Some(meta) = meta else {
        return Ok(Plan {
            path,
            target: Target::New,
        });
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        bail!("{shown} is a directory; name a file to restore into");
    }
    if kind.is_fifo() || kind.is_socket() {
        let what = if kind.is_fifo() { "FIFO" } else { "socket" };
        bail!("{shown} is a {what}; restore into a file or a block device");
    }
    if !force {
        if kind.is_block_device() || kind.is_char_device() {
            bail!("{shown} is a device; pass --force to write the image over it in place");
        }
        bail!("{shown} exists; pass --force to overwrite it");
    }
    let target = if kind.is_file() {
        Target::Replace(meta)
    } else {
        Target::Device {
            block: kind.is_block_device(),
        }
    };
    Ok(Plan { path, target })
}

/// Writes snapshot `id` of `store` as `plan` says. `progress` is called with the bytes done.
pub fn write(
    store: &Store,
    id: SnapshotId,
    plan: &Plan,
    progress: &dyn Fn(u64),
) -> Result<Written> {
    match &plan.target {
        Target::New => replace(store, id, &plan.path, None, progress),
        Target::Replace(meta) => replace(store, id, &plan.path, Some(meta), progress),
        Target::Device { block } => in_place(store, id, &plan.path, *block, progress),
    }
}

/// Restores into a new file beside `path` and renames it over `path`; with `original`, the new
/// file first gets its owner and mode.
fn replace(
    store: &Store,
    id: SnapshotId,
    path: &Path,
    original: Option<&Metadata>,
    progress: &dyn Fn(u64),
) -> Result<Written> {
    let started = Instant::now();
    let info = store.snapshot(id)?;
    let (size, ps) = (info.logical_size, u64::from(info.page_size));
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    // Only the caller may read a file that replaces another until it has that file's mode.
    let mode = if original.is_some() { 0o600 } else { 0o666 };
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".pagesnap.tmp")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "creating a temporary file in {} to restore into; check that the directory is writable",
                dir.display()
            )
        })?;
    let shown = tmp.path().to_path_buf();
    let io_err = |step: &str| {
        let (shown, step) = (shown.display().to_string(), step.to_string());
        move |e: io::Error| anyhow!("{shown}: {step} failed: {e}")
    };
    let file = tmp.as_file();
    file.set_len(size).map_err(io_err("sizing the output"))?;
    let mut pages = 0u64;
    for_each_page_batch(store, id, |first, n, runs| -> Result<()> {
        // Each run of consecutive pages goes out in one write; zero pages stay holes.
        for run in runs {
            let at = run.first * ps;
            let len = size.saturating_sub(at).min(run.bytes.len() as u64) as usize;
            file.write_all_at(&run.bytes[..len], at)
                .map_err(io_err("writing the output"))?;
            pages += run.pages;
        }
        // The device writes this batch while the next ones are read and checked, instead of
        // all of it at the final sync (a hint: an error here only loses the overlap).
        let _ = pagesnap_store::start_writeback(file, first * ps, n * ps);
        progress(((first + n) * ps).min(size));
        Ok(())
    })?;
    if let Some(m) = original {
        keep_owner(file, path, m)?;
        // After chown, which clears set-user-ID and set-group-ID bits.
        file.set_permissions(Permissions::from_mode(m.mode() & 0o7777))
            .map_err(io_err("giving the output the mode of the file it replaces"))?;
    }
    file.sync_all().map_err(io_err("syncing the output"))?;
    tmp.persist(path).map_err(|e| {
        anyhow!(
            "{}: renaming the restored image into place failed: {}",
            path.display(),
            e.error
        )
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the output directory {}", dir.display()))?;
    Ok(Written {
        image_size: size,
        pages,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Gives `file` the owner and group of `original` (the file at `path` it will replace). When the
/// caller may not (not root), warns and keeps what it may: the group, if the caller is in it.
fn keep_owner(file: &File, path: &Path, original: &Metadata) -> Result<()> {
    let (uid, gid) = (original.uid(), original.gid());
    let e = match std::os::unix::fs::fchown(file, Some(uid), Some(gid)) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => e,
        Err(e) => {
            return Err(anyhow!(
                "{}: giving the restored image the owner {uid}:{gid} of the file it replaces failed: {e}",
                path.display()
            ))
        }
    };
    let group = std::os::unix::fs::fchown(file, None, Some(gid)).is_ok();
    eprintln!(
        "pagesnap: warning: {} was owned by {uid}:{gid}; the restored image is owned by you{} ({e}; run as root to keep the owner)",
        path.display(),
        if group { " with group kept" } else { "" }
    );
    Ok(())
}

/// Writes the image over the device at `path` in place: every page, zero pages too.
fn in_place(
    store: &Store,
    id: SnapshotId,
    path: &Path,
    block: bool,
    progress: &dyn Fn(u64),
) -> Result<Written> {
    let started = Instant::now();
    let info = store.snapshot(id)?;
    let (size, ps) = (info.logical_size, u64::from(info.page_size));
    // A block device opened with O_EXCL is refused (EBUSY) while it is mounted or held by another
    // exclusive user (LVM, md, another restore): writing under a mounted file system destroys it.
    let mut options = OpenOptions::new();
    options.write(true);
    if block {
        options.custom_flags(libc::O_EXCL);
    }
    let mut file = match options.open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
            "{} is mounted or in use (the kernel refused exclusive access); unmount it, or stop what holds it, and retry; nothing was written",
            path.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the device {} for writing", path.display()))
        }
    };
    // What was opened, not what the name held when it was looked at.
    let kind = file
        .metadata()
        .with_context(|| format!("{}: stat", path.display()))?
        .file_type();
    if !(kind.is_block_device() || kind.is_char_device()) {
        bail!(
            "{} changed while the restore started (no longer a device); nothing was written — retry",
            path.display()
        );
    }
    // A block device's size is where its end is; a character device's is not known (0).
    let capacity = match file.seek(SeekFrom::End(0)) {
        Ok(n) => n,
        Err(e) if block => bail!(
            "{}: finding the device's size failed: {e}; nothing was written",
            path.display()
        ),
        Err(_) => 0,
    };
    if (block || capacity > 0) && capacity < size {
        bail!(
            "{} ({capacity} bytes) is smaller than snapshot {id} ({size} bytes); nothing was written — restore onto a device of at least {size} bytes",
            path.display()
        );
    }
    let mut pages = 0u64;
    let mut buf = Vec::new();
    for_each_page_batch(store, id, |first, n, runs| -> Result<()> {
        let at = first * ps;
        let bytes = (n * ps).min(size - at) as usize;
        buf.clear();
        buf.resize((n * ps) as usize, 0);
        for run in runs {
            let o = ((run.first - first) * ps) as usize;
            buf[o..o + run.bytes.len()].copy_from_slice(&run.bytes);
            pages += run.pages;
        }
        file.write_all_at(&buf[..bytes], at)
            .map_err(|e| anyhow!("{}: writing at offset {at} failed: {e}", path.display()))?;
        // As for a file: the device writes this batch while the next ones are read.
        let _ = pagesnap_store::start_writeback(&file, at, bytes as u64);
        progress(at + bytes as u64);
        Ok(())
    })
    .with_context(|| {
        format!(
            "{} may now hold part of the image (it is written in place); restore again",
            path.display()
        )
    })?;
    match file.sync_all() {
        Ok(()) => {}
        // A character device may have nothing to sync.
        Err(e) if !block && e.kind() == io::ErrorKind::InvalidInput => {}
        Err(e) => bail!(
            "{}: syncing failed: {e}; the image may not be on the device — restore again",
            path.display()
        ),
    }
    Ok(Written {
        image_size: size,
        pages,
        seconds: started.elapsed().as_secs_f64(),
    })
}
