//! Command-line arguments (clap). Parsing only: `commands` turns them into actions.

use clap::{Parser, Subcommand};
use pagesnap_store::Compression;
use std::path::PathBuf;

/// Incremental, page-granular snapshots of raw disk images, restored byte for byte.
#[derive(Debug, Parser)]
#[command(name = "pagesnap", version, about, long_about = None, after_help = "Example:\n  pagesnap --store /backup/vm init\n  pagesnap --store /backup/vm snapshot disk.img --label nightly\n  pagesnap --store /backup/vm restore nightly disk-restored.img")]
pub struct Cli {
    /// The store directory.
    #[arg(
        long,
        short = 's',
        env = "PAGESNAP_STORE",
        global = true,
        value_name = "DIR"
    )]
    pub store: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// An encrypted store's password, from this file (else PAGESNAP_PASSWORD_FILE, else
    /// PAGESNAP_PASSWORD, else a prompt on a terminal).
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an empty store.
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm init\n  pagesnap --store /backup/vm init --compression zstd:3\n\nCompression (of new pages, in frames of up to 16 pages; a frame that does not shrink by at least 1/32 is stored plain, so random data costs nothing to read):\n  auto      the default: zstd level 1 today (about 2.6x on an ext4 image, ~400 MB/s per core)\n  zstd:N    zstd at level N (-7..=19; higher is smaller and slower)\n  lz4       fastest, about 2.0x\n  none      pages as they are\nChange it later with `pagesnap compression SETTING` (pages already stored keep theirs)."
    )]
    Init {
        /// Compression of new pages: auto, zstd, zstd:LEVEL, lz4 or none.
        #[arg(long, default_value = "auto", value_parser = parse_compression)]
        compression: Compression,
        /// Encrypt the store (AES-256-GCM-SIV; the key wrapped by the password with
        /// Argon2id tuned to ~0.5 s here). The password: --new-password-file,
        /// PAGESNAP_NEW_PASSWORD_FILE, PAGESNAP_NEW_PASSWORD, or a prompt (twice).
        #[arg(long)]
        encrypt: bool,
        /// The new store's password, from this file (with --encrypt).
        #[arg(long, value_name = "FILE", requires = "encrypt")]
        new_password_file: Option<PathBuf>,
    },
    /// The passwords (key slots) of an encrypted store.
    #[command(
        subcommand,
        after_help = "Examples:
  pagesnap --store /backup/vm key list
  PAGESNAP_NEW_PASSWORD_FILE=~/second pagesnap --store /backup/vm key add --label laptop
  pagesnap --store /backup/vm key remove 2
  pagesnap --store /backup/vm key passwd

Every command needs one current password (--password-file, PAGESNAP_PASSWORD_FILE, PAGESNAP_PASSWORD, or a prompt); add and passwd a new one (--new-password-file, PAGESNAP_NEW_PASSWORD_FILE, PAGESNAP_NEW_PASSWORD, or a prompt, twice). A slot cannot remove itself: remove it with another password."
    )]
    Key(KeyCommand),
    /// Show the store's compression, or set it for pages written from now on.
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm compression\n  pagesnap --store /backup/vm compression lz4\n\nA store written by pagesnap before format 4 has no compression: run `pagesnap upgrade` first."
    )]
    Compression {
        /// auto, zstd, zstd:LEVEL, lz4 or none (show the current setting when absent).
        #[arg(value_parser = parse_compression)]
        setting: Option<Compression>,
    },
    /// Snapshot a raw disk image: only pages changed since the last snapshot of its name are written.
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm snapshot disk.img --label before-upgrade\n  pagesnap --store /backup/vm snapshot /dev/vg0/vm-snap\n\nWhile `pagesnap serve` serves the image with this store, the snapshot is taken by the server: only the pages written since the last one are read.\n\nAn image file unchanged since the store's last snapshot of it (same inode, size, mtime and ctime to the nanosecond, same path) is not read: the new snapshot has the last one's pages. A block device is read whole every time; quiesce it first (unmount, or fsfreeze).\n\nThe last line of output is the new snapshot's id."
    )]
    Snapshot {
        /// The raw image (a regular file) or a block device.
        image: PathBuf,
        /// A label to find the snapshot by (no ':', not `latest`: see NAME:LABEL).
        #[arg(long)]
        label: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Read the image even if it is unchanged since the last snapshot (same inode, size and
        /// times).
        #[arg(long)]
        reread: bool,
        /// The image's name in the store (default: its canonical path; for a block device its
        /// /dev/disk/by-id name if it has one). The new snapshot is diffed against the newest
        /// snapshot of this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the snapshots, with the image name each belongs to.
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm list --json\n  pagesnap --store /backup/vm list --name web"
    )]
    List {
        /// Only the snapshots of this image name.
        #[arg(long)]
        name: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots by a retention policy (restic's semantics), per image name.
    #[command(
        after_help = "Examples:\n  pagesnap --store /backup/vm forget --keep-daily 7 --keep-weekly 4 --dry-run\n  pagesnap --store /backup/vm forget --name web --keep-last 3 --keep-within 1m --prune\n\nEach image name's snapshots are judged on their own, newest first, by their creation time in UTC. A snapshot is kept if any rule keeps it: --keep-last N the N newest; --keep-hourly/daily/weekly/monthly/yearly N the newest snapshot of each of the N newest hours/days/ISO weeks/months/years that have snapshots (as restic 0.17+ does, a rule with counts left after the oldest snapshot keeps that one too, reason 'oldest daily' etc.); --keep-within DURATION (e.g. 1y5m7d2h) every snapshot newer than the newest one's time minus DURATION. The rest are deleted in one commit; --prune then reclaims their space (gc). A policy that keeps nothing is refused."
    )]
    Forget {
        /// Only the snapshots of this image name (default: every name, each on its own).
        #[arg(long)]
        name: Option<String>,
        /// Keep the N newest snapshots.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest snapshot of each of the N newest hours that have snapshots.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_hourly: u32,
        /// … of the N newest days.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_daily: u32,
        /// … of the N newest ISO weeks.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_weekly: u32,
        /// … of the N newest months.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_monthly: u32,
        /// … of the N newest years.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_yearly: u32,
        /// Keep every snapshot newer than the newest one's time minus DURATION (years, months,
        /// days, hours: 1y5m7d2h, 30d, 12h).
        #[arg(long, value_name = "DURATION", value_parser = crate::commands::parse_within)]
        keep_within: Option<pagesnap_engine::retention::Within>,
        /// Print what would be kept and removed, and why; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Reclaim the removed snapshots' space (gc) afterwards.
        #[arg(long, conflicts_with = "dry_run")]
        prune: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot out as a raw image, byte for byte (sparse where pages are zero).
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm restore 3 disk-as-of-3.img\n  pagesnap --store /backup/vm restore nightly disk.img --force"
    )]
    Restore {
        /// Snapshot: ID, LABEL (the newest with it), NAME:latest or NAME:LABEL.
        snapshot: String,
        /// Where to write the image (a symbolic link's target is written, the link kept).
        output: PathBuf,
        /// Overwrite OUTPUT if it exists: a file is replaced keeping its owner and mode, a
        /// block or character device is written in place.
        #[arg(long)]
        force: bool,
    },
    /// The byte ranges that differ between two snapshots.
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm diff 1 2")]
    Diff {
        /// First snapshot (ID, LABEL, NAME:latest or NAME:LABEL).
        a: String,
        /// Second snapshot (the same forms; may be of another image name).
        b: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum and Merkle root; exit 1 if anything is damaged.
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm verify\n  pagesnap --store /backup/vm verify 3 nightly"
    )]
    Verify {
        /// Snapshots to check (ID, LABEL, NAME:latest or NAME:LABEL; all when none).
        snapshots: Vec<String>,
    },
    /// Delete snapshots (their space is reclaimed by gc).
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm delete 1 2 && pagesnap --store /backup/vm gc"
    )]
    Delete {
        /// Snapshots to delete (ID, LABEL, NAME:latest or NAME:LABEL).
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Copy snapshots from one store to another (a directory or s3://BUCKET/PREFIX, either
    /// way), without reading any image again: only the pages that differ from the snapshot's
    /// parent, when the parent is already in the target, are sent, and the target's dedup
    /// keeps pages it already holds.
    #[command(
        after_help = "Example:\n  pagesnap copy --from /backup/vm --to s3://offsite/vm\n  pagesnap copy --from /backup/vm --to s3://offsite/vm nightly web:latest\n\nA snapshot already in the target (same time, size, label and name) is skipped, so running the same copy again sends nothing. Each store takes its password from --from-password-file / --to-password-file, else from the global sources (--password-file, PAGESNAP_PASSWORD_FILE, PAGESNAP_PASSWORD, a prompt). An encrypted store is never copied into one in clear."
    )]
    Copy {
        /// The store to copy from.
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        from: PathBuf,
        /// The store to copy to (created if it does not exist yet).
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        to: PathBuf,
        /// Snapshots to copy (ID, LABEL, NAME:latest or NAME:LABEL); default: all, oldest first.
        snapshots: Vec<String>,
        /// The source's password, from this file (else the global password sources).
        #[arg(long, value_name = "FILE")]
        from_password_file: Option<PathBuf>,
        /// The target's password, from this file (else the global password sources): with it,
        /// a store in clear can be copied into an encrypted one.
        #[arg(long, value_name = "FILE")]
        to_password_file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reclaim the space no retained snapshot uses.
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm gc")]
    Gc,
    /// Convert a store written by an older pagesnap (format 1, 2 or 3) to the current format,
    /// crash-safely (formats 1 and 2: everything is copied, then committed by one superblock
    /// write; format 3: the superblock's version alone changes). Compression stays off until
    /// `pagesnap compression` turns it on.
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm upgrade")]
    Upgrade,
    /// Store totals (snapshots, logical and stored bytes, dedup ratio) and each image name's.
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm info --json")]
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve a raw image read-write over NBD, every write tracked so that a snapshot reads only
    /// the pages written; or serve a stored snapshot read-only.
    #[command(
        after_help = "Examples:\n  pagesnap --store /backup/vm serve disk.img --socket /run/vm.sock\n  qemu-system-x86_64 -drive file=nbd+unix:///?socket=/run/vm.sock,format=raw ...\n  pagesnap --store /backup/vm snapshot disk.img        # asks the running server\n  pagesnap --store /backup/vm serve --snapshot nightly --socket /run/old.sock\n\nThe image stays a plain raw image. While the server runs, `pagesnap snapshot IMAGE` with the same store asks it (through a control socket in the store's served/ directory) and only the tracked pages are read. Tracking survives a clean stop (SIGTERM, SIGINT); after an unclean end (the server killed, the machine down) the next snapshot reads the whole image once, and says so. Clients may use the empty export name or the name shown."
    )]
    Serve {
        /// The raw image to serve read-write (a regular file).
        #[arg(required_unless_present = "snapshot")]
        image: Option<PathBuf>,
        /// Serve this stored snapshot (ID, LABEL, NAME:latest or NAME:LABEL) read-only instead
        /// of an image.
        #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["image", "snapshot_every"])]
        snapshot: Option<String>,
        /// Listen on a Unix socket at PATH.
        #[arg(long, value_name = "PATH", conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// Listen on TCP (127.0.0.1:10809 when neither this nor --socket is given).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// Take a snapshot every DURATION (e.g. 30s, 15m, 2h).
        #[arg(long, value_name = "DURATION", value_parser = crate::serve::parse_duration)]
        snapshot_every: Option<std::time::Duration>,
        /// The export's name (default: the image's file name, or snapshot-ID).
        #[arg(long)]
        name: Option<String>,
    },
    /// Build a sample image, snapshot it, change it, snapshot again, restore and verify both.
    #[command(after_help = "Example:\n  pagesnap demo")]
    Demo,
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  pagesnap completions bash > /etc/bash_completion.d/pagesnap"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `pagesnap key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the key slots (id, label, when added, Argon2id parameters; nothing secret).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a password (a new key slot).
    Add {
        /// A label for the slot (default: user@host).
        #[arg(long)]
        label: Option<String>,
        /// The new password, from this file.
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Remove a key slot (not the one whose password is given).
    Remove {
        /// The slot's id (`pagesnap key list`).
        id: u32,
    },
    /// Change the password given to a new one (its slot replaced; other slots unchanged).
    Passwd {
        /// The new password, from this file.
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse()
}
