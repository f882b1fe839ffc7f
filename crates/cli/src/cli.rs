//! Command-line arguments (clap). Parsing only: `commands` turns them into actions.

use clap::{Parser, Subcommand};
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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an empty store.
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm init")]
    Init,
    /// Snapshot a raw disk image: only pages changed since the store's last snapshot are written.
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm snapshot disk.img --label before-upgrade\n  pagesnap --store /backup/vm snapshot /dev/vg0/vm-snap\n\nWhile `pagesnap serve` serves the image with this store, the snapshot is taken by the server: only the pages written since the last one are read.\n\nAn image file unchanged since the store's last snapshot of it (same inode, size, mtime and ctime to the nanosecond, same path) is not read: the new snapshot has the last one's pages. A block device is read whole every time; quiesce it first (unmount, or fsfreeze).\n\nThe last line of output is the new snapshot's id."
    )]
    Snapshot {
        /// The raw image (a regular file) or a block device.
        image: PathBuf,
        /// A label to find the snapshot by.
        #[arg(long)]
        label: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Read the image even if it is unchanged since the last snapshot (same inode, size and
        /// times).
        #[arg(long)]
        reread: bool,
    },
    /// List the snapshots.
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm list --json")]
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot out as a raw image, byte for byte (sparse where pages are zero).
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm restore 3 disk-as-of-3.img\n  pagesnap --store /backup/vm restore nightly disk.img --force"
    )]
    Restore {
        /// Snapshot id, or label (the newest snapshot with it).
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
        /// First snapshot (id or label).
        a: String,
        /// Second snapshot (id or label).
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
        /// Snapshots to check (all when none).
        snapshots: Vec<String>,
    },
    /// Delete snapshots (their space is reclaimed by gc).
    #[command(
        after_help = "Example:\n  pagesnap --store /backup/vm delete 1 2 && pagesnap --store /backup/vm gc"
    )]
    Delete {
        /// Snapshots to delete (ids or labels).
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Reclaim the space no retained snapshot uses.
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm gc")]
    Gc,
    /// Convert a store written by an older pagesnap (format 1 or 2) to the current format,
    /// crash-safely (everything is copied, then committed by one superblock write).
    #[command(after_help = "Example:\n  pagesnap --store /backup/vm upgrade")]
    Upgrade,
    /// Store totals: snapshots, logical and stored bytes, dedup ratio.
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
        /// Serve this stored snapshot (id or label) read-only instead of an image.
        #[arg(long, value_name = "ID|LABEL", conflicts_with_all = ["image", "snapshot_every"])]
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
