//! What each command does, on the settings `cli` parsed.

use crate::cli::{Cli, Command};
use crate::output;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagesnap_engine::image::{restore_image, snapshot_image, snapshot_image_with, SnapshotOptions};
use pagesnap_engine::names::{self, name_of};
use pagesnap_engine::retention::{self, Policy, Within};
use pagesnap_remote::{ObjectStorage, StoreUrl};
use pagesnap_store::keys::{Password, PasswordRole};
use pagesnap_store::{Compression, Mode, SnapshotId, SnapshotInfo, Store, StoreOptions, Vpn};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a store is.
#[derive(Debug)]
pub(crate) enum StoreAt {
    Dir(PathBuf),
    Remote(StoreUrl),
}

impl StoreAt {
    pub(crate) fn parse(p: &Path) -> Result<StoreAt> {
        match p.to_str().and_then(StoreUrl::parse) {
            Some(url) => Ok(StoreAt::Remote(url?)),
            None => Ok(StoreAt::Dir(p.to_path_buf())),
        }
    }

    pub(crate) fn display(&self) -> String {
        match self {
            StoreAt::Dir(d) => d.display().to_string(),
            StoreAt::Remote(u) => u.display(),
        }
    }
}

/// Exit status: success.
pub const OK: i32 = 0;
/// Exit status: verify found damage.
pub const DAMAGED: i32 = 1;

pub(crate) struct Ctx {
    pub(crate) store: Option<PathBuf>,
    quiet: bool,
    password_file: Option<PathBuf>,
    /// The password once asked (one prompt per command, however many opens).
    pub(crate) password: std::cell::OnceCell<Password>,
    /// The object storage of the store last opened, if it is on object storage.
    pub(crate) remote: std::cell::RefCell<Option<Arc<ObjectStorage>>>,
}

impl Ctx {
    pub(crate) fn new(store: Option<PathBuf>, quiet: bool, password_file: Option<PathBuf>) -> Ctx {
        Ctx {
            store,
            quiet,
            password_file,
            password: std::cell::OnceCell::new(),
            remote: std::cell::RefCell::new(None),
        }
    }

    pub(crate) fn quiet_flag(&self) -> bool {
        self.quiet
    }

    pub(crate) fn password_file_flag(&self) -> Option<PathBuf> {
        self.password_file.clone()
    }

    /// Creates an empty, unencrypted store where this context points.
    pub(crate) fn init_store(&self, opts: StoreOptions) -> Result<()> {
        let at = self.at()?;
        match &at {
            StoreAt::Dir(d) => Store::init(d, opts),
            StoreAt::Remote(_) => Store::init_with(self.storage(&at)?, opts),
        }
        .with_context(|| format!("creating store {}", at.display()))?;
        Ok(())
    }

    /// Where the store is: a directory or `s3://BUCKET/PREFIX`.
    pub(crate) fn at(&self) -> Result<StoreAt> {
        let p = self.store.as_deref().ok_or_else(|| {
            anyhow!("no store given: pass --store DIR|s3://BUCKET/PREFIX or set PAGESNAP_STORE")
        })?;
        StoreAt::parse(p)
    }

    /// The store's directory, for the commands that need one on this machine (`serve`).
    pub(crate) fn dir(&self) -> Result<&Path> {
        match self.at()? {
            StoreAt::Dir(_) => Ok(self.store.as_deref().unwrap_or(Path::new("."))),
            StoreAt::Remote(u) => bail!(
                "{}: this command needs a store directory on this machine (a store on object storage can be snapshotted, listed, restored, verified and copied, not served)",
                u.display()
            ),
        }
    }

    /// The store's directory, or `None` for a store on object storage.
    pub(crate) fn local_dir(&self) -> Result<Option<&Path>> {
        Ok(match self.at()? {
            StoreAt::Dir(_) => self.store.as_deref(),
            StoreAt::Remote(_) => None,
        })
    }

    /// Whether the store is encrypted (its key id), from its superblock.
    pub(crate) fn encryption(&self) -> Result<Option<pagesnap_store::keys::KeyId>> {
        let at = self.at()?;
        match &at {
            StoreAt::Dir(dir) => Store::encryption_of(dir),
            StoreAt::Remote(_) => Store::encryption_of_storage(&*self.storage(&at)?),
        }
        .with_context(|| format!("opening store {}", at.display()))
    }

    /// The storage of a store on object storage (opened once per command).
    fn storage(&self, at: &StoreAt) -> Result<Arc<ObjectStorage>> {
        let StoreAt::Remote(url) = at else {
            bail!("{} is a directory", at.display());
        };
        if let Some(s) = self.remote.borrow().as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(
            url.storage(pagesnap_remote::default_cache_root().as_deref())
                .with_context(|| format!("opening store {}", url.display()))?,
        );
        *self.remote.borrow_mut() = Some(s.clone());
        Ok(s)
    }

    /// What went to and came from object storage in this command (`None`: a local store).
    pub(crate) fn traffic(&self) -> Option<pagesnap_remote::TrafficReport> {
        self.remote.borrow().as_ref().map(|s| s.traffic())
    }

    /// The password of the store, if it is encrypted (asked once).
    pub(crate) fn password_for(&self, at: &StoreAt) -> Result<Option<Password>> {
        let encryption = match at {
            StoreAt::Dir(dir) => Store::encryption_of(dir),
            StoreAt::Remote(_) => Store::encryption_of_storage(&*self.storage(at)?),
        };
        let dir = at.display();
        let dir = Path::new(&dir);
        match encryption {
            Ok(Some(_)) => {}
            // Not encrypted (by its superblock) although a password is given: handed to open,
            // which refuses — the superblock may have been downgraded, and writing on would put
            // data in clear. Never prompted for.
            Ok(None) if self.password_given() => {
                return crate::password::password(
                    PasswordRole::Current,
                    self.password_file.as_deref(),
                )
                .map(Some)
                .with_context(|| format!("reading the password for {}", dir.display()));
            }
            // Not encrypted, or not a store: open says which.
            _ => return Ok(None),
        }
        if self.password.get().is_none() {
            let p = crate::password::password(PasswordRole::Current, self.password_file.as_deref())
                .with_context(|| format!("{} is encrypted", dir.display()))?;
            let _ = self.password.set(p);
        }
        Ok(self
            .password
            .get()
            .map(|p| Password::new(p.as_bytes().to_vec())))
    }

    /// A password source is set (a flag or a variable), as opposed to a prompt.
    fn password_given(&self) -> bool {
        self.password_file.is_some()
            || [
                PasswordRole::Current.env(),
                PasswordRole::Current.file_env(),
            ]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    }

    pub(crate) fn open(&self, mode: Mode) -> Result<Store> {
        let at = self.at()?;
        let password = self.password_for(&at)?;
        let shown = at.display();
        let dir = Path::new(&shown);
        let (store, report) = match &at {
            StoreAt::Dir(d) => Store::open_encrypted(d, mode, password.as_ref()),
            StoreAt::Remote(_) => Store::open_with_key(
                self.storage(&at)?,
                mode,
                StoreOptions::default(),
                password.as_ref(),
            ),
        }
        .with_context(|| format!("opening store {}", dir.display()))?;
        if report.damaged_slot {
            if let Some(note) = &report.superblock_note {
                eprintln!("pagesnap: warning: {note}");
            }
        }
        if report.repaired_slot && report.damaged_slot {
            eprintln!(
                "pagesnap: repaired the superblock of {}: both slots hold generation {} again",
                dir.display(),
                report.generation
            );
        }
        for seg in &report.damaged_segments {
            eprintln!(
                "pagesnap: warning: the header of {} in {} is damaged; its records are still checked one by one: run `pagesnap verify`",
                seg,
                dir.display()
            );
        }
        for q in &report.quarantined {
            eprintln!(
                "pagesnap: warning: {} holds a segment file no superblock slot lists; set aside as {q} (not deleted: remove it once `pagesnap verify` is clean)",
                dir.display()
            );
        }
        if let Some(note) = &report.discarded_tail {
            eprintln!("pagesnap: warning: {note}");
        }
        if report.repaired_records > 0 {
            eprintln!(
                "pagesnap: repaired {} damaged copy(ies) of commit records in {} from their other copy",
                report.repaired_records,
                dir.display()
            );
        }
        if !report.damaged.is_empty() {
            let ids: Vec<String> = report.damaged.iter().map(|i| i.to_string()).collect();
            eprintln!(
                "pagesnap: warning: snapshot(s) {} are damaged; run `pagesnap verify`",
                ids.join(", ")
            );
        }
        Ok(store)
    }

    fn bar(&self, total: u64, what: &str) -> ProgressBar {
        if self.quiet || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        bar
    }
}

/// Runs the command; returns the exit status.
pub fn run(cli: Cli) -> Result<i32> {
    let ctx = Ctx::new(cli.store, cli.quiet, cli.password_file);
    match cli.command {
        Command::Init {
            compression,
            encrypt,
            new_password_file,
        } => init(&ctx, compression, encrypt, new_password_file.as_deref()),
        Command::Key(k) => crate::keycmd::key(&ctx, k),
        Command::Compression { setting } => compression(&ctx, setting),
        Command::Snapshot {
            image,
            label,
            json,
            reread,
            name,
        } => snapshot(&ctx, &image, label, json, reread, name),
        Command::List { name, json } => list(&ctx, name.as_deref(), json),
        Command::Forget {
            name,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within,
            dry_run,
            prune,
            json,
        } => forget(
            &ctx,
            name.as_deref(),
            Policy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                within: keep_within,
            },
            ForgetHow {
                dry_run,
                prune,
                json,
            },
        ),
        Command::Restore {
            snapshot,
            output,
            force,
        } => restore(&ctx, &snapshot, &output, force),
        Command::Diff { a, b, json } => diff(&ctx, &a, &b, json),
        Command::Verify { snapshots } => verify(&ctx, &snapshots),
        Command::Delete { snapshots } => delete(&ctx, &snapshots),
        Command::Gc => gc(&ctx),
        Command::Copy {
            from,
            to,
            snapshots,
            json,
            from_password_file,
            to_password_file,
        } => crate::copy::copy(
            &ctx,
            crate::copy::Sides {
                from: &from,
                to: &to,
                from_password_file,
                to_password_file,
            },
            &snapshots,
            json,
        ),
        Command::Upgrade => upgrade(&ctx),
        Command::Info { json } => info(&ctx, json),
        Command::Serve {
            image,
            snapshot,
            socket,
            listen,
            snapshot_every,
            name,
        } => crate::serve::serve(
            &ctx,
            crate::serve::ServeArgs {
                image,
                snapshot,
                socket,
                listen,
                snapshot_every,
                name,
            },
        ),
        Command::Demo => demo(ctx.quiet),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "pagesnap", &mut std::io::stdout());
            Ok(OK)
        }
    }
}

fn init(
    ctx: &Ctx,
    compression: Compression,
    encrypt: bool,
    new_file: Option<&Path>,
) -> Result<i32> {
    let at = ctx.at()?;
    let shown = at.display();
    let dir = Path::new(&shown);
    let opts = StoreOptions {
        compression,
        ..StoreOptions::default()
    };
    if encrypt {
        let password = crate::password::password(PasswordRole::New, new_file)?;
        let kdf = crate::keycmd::kdf()?;
        let label = crate::keycmd::default_label();
        let store = match &at {
            StoreAt::Dir(d) => Store::init_encrypted(d, opts, &password, kdf, &label),
            StoreAt::Remote(_) => {
                Store::init_encrypted_with(ctx.storage(&at)?, opts, &password, kdf, &label)
            }
        }
        .with_context(|| format!("creating store {}", dir.display()))?;
        println!(
            "created an empty encrypted store in {} (compression {}; {}; key slot 1, {kdf}): \
             keep the password — without it nothing in the store can be read",
            dir.display(),
            describe(compression),
            store.cipher().map(|c| c.to_string()).unwrap_or_default()
        );
        return Ok(OK);
    }
    match &at {
        StoreAt::Dir(d) => Store::init(d, opts),
        StoreAt::Remote(_) => Store::init_with(ctx.storage(&at)?, opts),
    }
    .with_context(|| format!("creating store {}", dir.display()))?;
    println!(
        "created an empty store in {} (compression {})",
        dir.display(),
        describe(compression)
    );
    Ok(OK)
}

/// A compression setting as a user reads it (`auto` says what it means today).
fn describe(c: Compression) -> String {
    match c {
        Compression::Auto => {
            let (_, level) = c.resolve();
            format!("auto: zstd level {level}")
        }
        c => c.to_string(),
    }
}

fn compression(ctx: &Ctx, setting: Option<Compression>) -> Result<i32> {
    let Some(c) = setting else {
        let store = ctx.open(Mode::Read)?;
        println!("{}", describe(store.compression()));
        return Ok(OK);
    };
    let mut store = ctx.open(Mode::Write)?;
    let old = store.compression();
    store
        .set_compression(c)
        .with_context(|| format!("setting the compression of {}", store.location().display()))?;
    println!(
        "compression of new pages: {} (was {}); pages already stored keep theirs",
        describe(c),
        describe(old)
    );
    Ok(OK)
}

/// A snapshot named by `ID`, `LABEL` (the newest snapshot with that label), `NAME:latest` (the
/// newest snapshot of an image name) or `NAME:LABEL` (the newest of that name with that label).
/// A name may itself hold colons: every split at a colon whose left side is a known name is tried,
/// the longest name first, and the first that resolves is taken. New labels hold no `:` and are
/// never `latest` ([`names::check_label`]), so `NAME:X` and a label cannot meet; when a label
/// written before that rule equals the whole argument, or two splits resolve, and they are
/// different snapshots, the argument is refused as ambiguous, naming each (give the id).
pub(crate) fn resolve(store: &Store, arg: &str) -> Result<SnapshotId> {
    let snaps = store.snapshots()?;
    if let Ok(id) = arg.parse::<u64>() {
        if snaps.iter().any(|s| s.id.0 == id) {
            return Ok(SnapshotId(id));
        }
    }
    // (snapshot, how the argument reaches it)
    let mut found: Vec<(SnapshotId, String)> = Vec::new();
    if let Some(s) = snaps.iter().rev().find(|s| s.label.as_deref() == Some(arg)) {
        found.push((
            s.id,
            format!("the label '{arg}' of image name '{}'", name_of(s)),
        ));
    }
    let mut missing = None;
    for (at, _) in arg.rmatch_indices(':') {
        let (name, what) = (&arg[..at], &arg[at + 1..]);
        if !snaps.iter().any(|s| name_of(s) == name) {
            continue;
        }
        let hit = snaps
            .iter()
            .rev()
            .filter(|s| name_of(s) == name)
            .find(|s| what == "latest" || s.label.as_deref() == Some(what));
        match hit {
            Some(s) if !found.iter().any(|(id, _)| *id == s.id) => {
                let how = if what == "latest" {
                    format!("the newest of image name '{name}'")
                } else {
                    format!("image name '{name}' with the label '{what}'")
                };
                found.push((s.id, how));
            }
            Some(_) => {}
            None => {
                missing.get_or_insert((name, what));
            }
        }
    }
    match found.as_slice() {
        [(id, _)] => Ok(*id),
        [] => match missing {
            Some((name, what)) => bail!("unknown snapshot '{arg}': no snapshot of image name '{name}' has the label '{what}'; `pagesnap list --name '{name}'` shows them"),
            None => bail!("unknown snapshot '{arg}': no snapshot has that id or label, and it is not NAME:latest or NAME:LABEL of a known image name; `pagesnap list` shows them"),
        },
        many => {
            let each: Vec<String> = many
                .iter()
                .map(|(id, how)| format!("snapshot {} ({how})", id.0))
                .collect();
            bail!(
                "ambiguous snapshot '{arg}': it names {}; give the snapshot's id instead",
                each.join(" and ")
            )
        }
    }
}

/// Refuses an image name no snapshot has, listing some that exist.
fn known_name(snaps: &[SnapshotInfo], name: &str) -> Result<()> {
    let mut all: Vec<String> = snaps.iter().map(name_of).collect();
    all.sort();
    all.dedup();
    if all.iter().any(|n| n == name) {
        return Ok(());
    }
    let some: Vec<String> = all.iter().take(5).map(|n| format!("'{n}'")).collect();
    let more = if all.len() > 5 { ", …" } else { "" };
    if all.is_empty() {
        bail!("unknown image name '{name}': the store has no snapshots");
    }
    bail!(
        "unknown image name '{name}': no snapshot has it (the store has {}{more}); `pagesnap list` shows each snapshot's name",
        some.join(", ")
    )
}

/// `--keep-within`'s parser.
pub(crate) fn parse_within(text: &str) -> std::result::Result<Within, String> {
    Within::parse(text)
}

fn snapshot(
    ctx: &Ctx,
    image: &Path,
    label: Option<String>,
    as_json: bool,
    reread: bool,
    name: Option<String>,
) -> Result<i32> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(n) = &name {
        names::check_name(n).map_err(|e| anyhow!("{e}"))?;
    }
    if let Some(l) = &label {
        names::check_label(l).map_err(|e| anyhow!("{e}"))?;
    }
    let m =
        std::fs::metadata(image).with_context(|| format!("reading image {}", image.display()))?;
    // A block device's length is where its end is; `stat` says 0.
    let size = if m.file_type().is_block_device() {
        use std::io::Seek;
        std::fs::File::open(image)
            .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
            .with_context(|| format!("reading block device {}", image.display()))?
    } else {
        m.len()
    };
    // A server of this image with this store takes the snapshot itself (tracked pages only),
    // under the image's default name.
    let default_named = match &name {
        None => true,
        Some(n) => names::default_name(image).is_ok_and(|d| d == *n),
    };
    let served = if let Some(dir) = ctx.local_dir()?.filter(|_| default_named) {
        crate::serve::snapshot_via_server(dir, image, label.as_deref(), reread)?
    } else {
        if let Some(dir) = ctx.local_dir()? {
            if crate::serve::served(dir, image)
                .is_ok_and(|p| std::os::unix::net::UnixStream::connect(&p.control).is_ok())
            {
                bail!(
                    "{} is served by a running `pagesnap serve`, whose snapshots take the image's default name; omit --name, or stop the server",
                    image.display()
                );
            }
        }
        None
    };
    if let Some(report) = served {
        if as_json {
            println!("{report}");
        } else {
            let n = |k: &str| {
                report
                    .get(k)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            let full = report
                .get("full_read")
                .and_then(serde_json::Value::as_str)
                .map(|w| format!("; the whole image was read: {w}"))
                .unwrap_or_default();
            println!(
                "taken by the running server: {} pages tracked, {} read, {} changed, {} new ({} data + {} metadata) in {:.2} s{full}",
                n("pages_tracked"),
                n("pages_read"),
                n("pages_changed"),
                n("pages_written"),
                HumanBytes(n("data_bytes")),
                HumanBytes(n("meta_bytes")),
                report.get("seconds").and_then(serde_json::Value::as_f64).unwrap_or(0.0),
            );
            println!("{}", n("id"));
        }
        return Ok(OK);
    }
    // No server answers, but one served this image and did not stop cleanly: the image may
    // hold writes (made durable by a client's FLUSH) whose timestamps did not survive a crash,
    // so its identity cannot vouch for it: read it whole.
    let mut reread = reread;
    if !reread {
        if let Some(why) = ctx
            .local_dir()?
            .and_then(|dir| crate::serve::served(dir, image).ok())
            .and_then(|p| pagesnap_engine::tracked::unclean_end(&p.state))
        {
            eprintln!("pagesnap: note: reading the whole image: {why}");
            reread = true;
        }
    }
    let mut store = ctx.open(Mode::Write)?;
    let bar = ctx.bar(size, "snapshot");
    let report = snapshot_image_with(
        &mut store,
        image,
        label,
        &|done| bar.set_position(done),
        SnapshotOptions { reread, name },
    )
    .with_context(|| format!("snapshotting {}", image.display()))?;
    bar.finish_and_clear();
    if as_json {
        let mut v = json!({
            "id": report.id.0,
            "image_size": report.image_size,
            "pages_read": report.pages_read,
            "pages_changed": report.pages_changed,
            "pages_written": report.pages_written,
            "bytes_written": report.data_bytes + report.meta_bytes,
            "data_bytes": report.data_bytes,
            "meta_bytes": report.meta_bytes,
            "seconds": report.seconds,
            "unchanged": report.unchanged,
        });
        if let Some(t) = ctx.traffic() {
            v["transfer"] = traffic_json(t);
        }
        println!("{v}");
    } else {
        println!(
            "{} pages read, {} changed, {} new ({} data + {} metadata) in {:.2} s{}",
            report.pages_read,
            report.pages_changed,
            report.pages_written,
            HumanBytes(report.data_bytes),
            HumanBytes(report.meta_bytes),
            report.seconds,
            if report.unchanged {
                " (unchanged since the last snapshot of its name: same inode, size and times; not read)"
            } else {
                ""
            }
        );
        println!("{}", report.id);
    }
    Ok(OK)
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a Unix time in milliseconds (proleptic Gregorian).
pub(crate) fn utc(ms: u64) -> String {
    let (y, m, d, h) = pagesnap_engine::retention::civil(ms);
    let secs = ms / 1000 % 3600;
    format!(
        "{y:04}-{m:02}-{d:02} {h:02}:{:02}:{:02}",
        secs / 60,
        secs % 60
    )
}

fn list(ctx: &Ctx, name: Option<&str>, as_json: bool) -> Result<i32> {
    let store = ctx.open(Mode::Read)?;
    let mut snaps = store.snapshots()?;
    if let Some(n) = name {
        known_name(&snaps, n)?;
        snaps.retain(|s| name_of(s) == n);
    }
    if as_json {
        let rows: Vec<_> = snaps.iter().map(snapshot_json).collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(OK);
    }
    // IMAGE: the image's size; STORED: its non-zero pages; NEW: pages no earlier snapshot had
    // (uncompressed); ADDED: what the snapshot added to the store (compressed, with its index).
    println!(
        "{:>4}  {:<20}  {:<19}  {:>10}  {:>10}  {:>9}  {:>10}  {:>10}  NAME",
        "ID", "LABEL", "TIME (UTC)", "IMAGE", "STORED", "CHANGED", "NEW", "ADDED"
    );
    for s in &snaps {
        let ps = u64::from(s.page_size);
        println!(
            "{:>4}  {:<20}  {:<19}  {:>10}  {:>10}  {:>9}  {:>10}  {:>10}  {}",
            s.id.0,
            s.label.as_deref().unwrap_or("-"),
            utc(s.time_unix_ms),
            HumanBytes(s.logical_size).to_string(),
            HumanBytes(s.page_count * ps).to_string(),
            s.pages_changed,
            HumanBytes(s.pages_written * ps).to_string(),
            HumanBytes(s.data_bytes + s.meta_bytes).to_string(),
            name_of(s)
        );
    }
    Ok(OK)
}

/// What a command sent to and fetched from object storage.
pub(crate) fn traffic_json(t: pagesnap_remote::TrafficReport) -> serde_json::Value {
    json!({
        "bytes_uploaded": t.bytes_up,
        "bytes_downloaded": t.bytes_down,
        "puts": t.puts,
        "gets": t.gets,
        "cache_hits": t.cache_hits,
    })
}

fn snapshot_json(s: &SnapshotInfo) -> serde_json::Value {
    json!({
        "id": s.id.0,
        "name": name_of(s),
        "label": s.label,
        "time_unix_ms": s.time_unix_ms,
        "time": utc(s.time_unix_ms),
        "image_size": s.logical_size,
        "page_size": s.page_size,
        "pages_stored": s.page_count,
        "pages_changed": s.pages_changed,
        "pages_written": s.pages_written,
        "stored_bytes": s.page_count * u64::from(s.page_size),
        "new_bytes": s.pages_written * u64::from(s.page_size),
        "compressed_bytes": s.data_bytes,
        "bytes_added": s.data_bytes + s.meta_bytes,
        "merkle_root": s.merkle_root.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "parent": s.parent.map(|p| p.0),
        "origin": s.origin,
    })
}

fn restore(ctx: &Ctx, name: &str, output: &Path, force: bool) -> Result<i32> {
    let store = ctx.open(Mode::Read)?;
    let id = resolve(&store, name)?;
    let plan = output::plan(output, ctx.local_dir()?, force)?;
    let info = store.snapshot(id)?;
    let bar = ctx.bar(info.logical_size, "restore");
    let report = output::write(&store, id, &plan, &|done| bar.set_position(done))
        .with_context(|| format!("restoring snapshot {id} to {}", output.display()))?;
    bar.finish_and_clear();
    let onto = if plan.path == output {
        String::new()
    } else {
        format!(" (-> {})", plan.path.display())
    };
    let how = match plan.target {
        output::Target::Device { .. } => ", written in place",
        _ => "",
    };
    println!(
        "restored snapshot {id} to {}{onto} ({}, {} non-zero pages{how}) in {:.2} s",
        output.display(),
        HumanBytes(report.image_size),
        report.pages,
        report.seconds
    );
    Ok(OK)
}

fn diff(ctx: &Ctx, a: &str, b: &str, as_json: bool) -> Result<i32> {
    let store = ctx.open(Mode::Read)?;
    let (ia, ib) = (resolve(&store, a)?, resolve(&store, b)?);
    let ps = u64::from(store.page_size());
    let pages = store.diff(ia, ib)?;
    // Coalesce page numbers into byte ranges.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for Vpn(v) in pages {
        match ranges.last_mut() {
            Some(r) if r.1 == v => r.1 = v + 1,
            _ => ranges.push((v, v + 1)),
        }
    }
    let (sa, sb) = (
        store.snapshot(ia)?.logical_size,
        store.snapshot(ib)?.logical_size,
    );
    if as_json {
        let rows: Vec<_> = ranges
            .iter()
            .map(|(s, e)| json!({"start": s * ps, "end": e * ps, "pages": e - s}))
            .collect();
        println!(
            "{}",
            json!({"a": ia.0, "b": ib.0, "size_a": sa, "size_b": sb, "ranges": rows})
        );
        return Ok(OK);
    }
    if sa != sb {
        println!("size: {sa} -> {sb} bytes");
    }
    for (s, e) in &ranges {
        println!("{:#014x}..{:#014x}  {} page(s)", s * ps, e * ps, e - s);
    }
    println!(
        "{} range(s), {} page(s) differ",
        ranges.len(),
        ranges.iter().map(|(s, e)| e - s).sum::<u64>()
    );
    Ok(OK)
}

fn verify(ctx: &Ctx, names: &[String]) -> Result<i32> {
    let store = ctx.open(Mode::Read)?;
    let ids: Vec<SnapshotId> = names
        .iter()
        .map(|n| resolve(&store, n))
        .collect::<Result<_>>()?;
    let bar = ctx.bar(0, "verify");
    let report = store.verify(&ids)?;
    bar.finish_and_clear();
    let ps = u64::from(store.page_size());
    for n in &report.notes {
        eprintln!("pagesnap: note: {n}");
    }
    for d in &report.damage {
        match (d.snapshot, d.vpn) {
            (Some(s), Some(v)) => println!(
                "DAMAGED snapshot {s}, page {} (offset {:#x}): {}",
                v.0,
                v.0 * ps,
                d.detail
            ),
            (Some(s), None) => println!("DAMAGED snapshot {s}: {}", d.detail),
            (None, _) => println!("DAMAGED store metadata: {}", d.detail),
        }
    }
    let mut hit: Vec<u64> = report
        .damage
        .iter()
        .filter_map(|d| d.snapshot.map(|s| s.0))
        .collect();
    hit.sort_unstable();
    hit.dedup();
    println!(
        "{} snapshot(s), {} page records and {} index nodes checked: {}",
        report.snapshots_checked,
        report.pages_checked,
        report.nodes_checked,
        if report.is_clean() {
            "clean".to_string()
        } else if hit.is_empty() {
            "damage found in the store's metadata (every snapshot is intact)".to_string()
        } else {
            format!("damage found in snapshot(s) {:?}", hit)
        }
    );
    Ok(if report.is_clean() { OK } else { DAMAGED })
}

fn delete(ctx: &Ctx, names: &[String]) -> Result<i32> {
    let mut store = ctx.open(Mode::Write)?;
    let ids: Vec<SnapshotId> = names
        .iter()
        .map(|n| resolve(&store, n))
        .collect::<Result<_>>()?;
    store.delete(&ids)?;
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    println!(
        "deleted snapshot(s) {}; run `pagesnap gc` to reclaim their space",
        ids.join(", ")
    );
    Ok(OK)
}

fn gc(ctx: &Ctx) -> Result<i32> {
    let mut store = ctx.open(Mode::Write)?;
    let bar = ctx.bar(0, "gc");
    let report = store.gc()?;
    // On object storage, also the pieces no head names (an interrupted upload's).
    let swept = match ctx.remote.borrow().as_ref() {
        Some(s) => s.sweep().with_context(|| {
            format!(
                "deleting unreferenced objects of {}",
                store.location().display()
            )
        })?,
        None => 0,
    };
    if swept > 0 {
        println!("deleted {swept} object(s) that no commit names (interrupted uploads)");
    }
    bar.finish_and_clear();
    println!(
        "freed {} ({} -> {}), {} old segment file(s) removed",
        HumanBytes(report.bytes_freed),
        HumanBytes(report.bytes_before),
        HumanBytes(report.bytes_after),
        report.segments_removed
    );
    Ok(OK)
}

fn upgrade(ctx: &Ctx) -> Result<i32> {
    let mut store = ctx.open(Mode::Write)?;
    let from = store.format_version();
    let bar = ctx.bar(0, "upgrade");
    let n = store.upgrade()?;
    bar.finish_and_clear();
    if from == store.format_version() {
        println!(
            "{} is already in format {}: nothing to do",
            store.location().display(),
            from
        );
    } else {
        println!(
            "upgraded {} from format {from} to format {}: {n} snapshot(s) converted",
            store.location().display(),
            store.format_version()
        );
    }
    Ok(OK)
}

fn info(ctx: &Ctx, as_json: bool) -> Result<i32> {
    let store = ctx.open(Mode::Read)?;
    let snaps = store.snapshots()?;
    let space = store.check()?;
    let logical: u64 = snaps.iter().map(|s| s.logical_size).sum();
    let ratio = if space.record_bytes == 0 {
        0.0
    } else {
        logical as f64 / space.record_bytes as f64
    };
    // Distinct stored pages, uncompressed, and the bytes they take on disk.
    let stored = space.pages * u64::from(store.page_size());
    let compression_ratio = if space.page_bytes == 0 {
        0.0
    } else {
        stored as f64 / space.page_bytes as f64
    };
    if as_json {
        println!(
            "{}",
            json!({
                "snapshots": snaps.len(),
                "logical_bytes": logical,
                "stored_bytes": stored,
                "compressed_bytes": space.page_bytes,
                "compression_ratio": compression_ratio,
                "store_bytes": space.record_bytes,
                "live_bytes": space.live_bytes,
                "reclaimable_bytes": space.leaked_bytes,
                "dedup_ratio": ratio,
                "page_size": store.page_size(),
                "format_version": store.format_version(),
                "generation": store.generation(),
                "compression": store.compression().to_string(),
                "encryption": store.cipher().map(|c| c.to_string()),
                "names": per_name(&snaps).iter().map(|(n, count, logical, added, latest)| json!({
                    "name": n,
                    "snapshots": count,
                    "logical_bytes": logical,
                    "bytes_added": added,
                    "latest": latest,
                })).collect::<Vec<_>>(),
            })
        );
    } else {
        println!("store        {}", store.location().display());
        println!("snapshots    {}", snaps.len());
        println!("logical      {} (the images' sizes)", HumanBytes(logical));
        println!(
            "stored       {} (distinct non-zero pages, uncompressed)",
            HumanBytes(stored)
        );
        println!(
            "compressed   {} ({compression_ratio:.2}x)",
            HumanBytes(space.page_bytes)
        );
        println!(
            "on disk      {} with the index ({} reclaimable by gc)",
            HumanBytes(space.record_bytes),
            HumanBytes(space.leaked_bytes)
        );
        println!("dedup ratio  {ratio:.2}x (logical / on disk)");
        println!("format       {}", store.format_version());
        println!("compression  {}", describe(store.compression()));
        if let Some(c) = store.cipher() {
            println!("encryption   {c} (scheme {}), keyed page ids", c.scheme());
        }
        for (n, count, logical, added, latest) in per_name(&snaps) {
            println!(
                "name         {n}: {count} snapshot(s), {} logical, {} added, latest {latest}",
                HumanBytes(logical),
                HumanBytes(added)
            );
        }
    }
    Ok(OK)
}

/// Per image name, in name order: (name, snapshots, logical bytes, bytes added, newest id).
fn per_name(snaps: &[SnapshotInfo]) -> Vec<(String, usize, u64, u64, u64)> {
    let mut by: std::collections::BTreeMap<String, (usize, u64, u64, u64)> = Default::default();
    for s in snaps {
        let e = by.entry(name_of(s)).or_default();
        e.0 += 1;
        e.1 += s.logical_size;
        e.2 += s.data_bytes + s.meta_bytes;
        e.3 = e.3.max(s.id.0);
    }
    by.into_iter()
        .map(|(n, (c, l, a, id))| (n, c, l, a, id))
        .collect()
}

/// How `forget` reports and acts.
struct ForgetHow {
    dry_run: bool,
    prune: bool,
    json: bool,
}

fn forget(ctx: &Ctx, name: Option<&str>, policy: Policy, how: ForgetHow) -> Result<i32> {
    if policy.is_empty() {
        bail!("no retention policy given: forget would remove every snapshot; give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly (N > 0) or --keep-within (a non-zero duration); `pagesnap delete` removes snapshots by id");
    }
    if let Some(n) = name {
        // Checked by a reader first: a writer's open already writes (a superblock hint), and
        // a refused command changes nothing.
        known_name(&ctx.open(Mode::Read)?.snapshots()?, n)?;
    }
    let mut store = ctx.open(if how.dry_run { Mode::Read } else { Mode::Write })?;
    let snaps = store.snapshots()?;
    if let Some(n) = name {
        known_name(&snaps, n)?;
    }
    let mut groups: std::collections::BTreeMap<String, Vec<&SnapshotInfo>> = Default::default();
    for s in &snaps {
        let n = name_of(s);
        if name.is_none_or(|want| want == n) {
            groups.entry(n).or_default().push(s);
        }
    }
    let mut remove: Vec<SnapshotId> = Vec::new();
    let mut rows = Vec::new();
    for (n, group) in &groups {
        let times: Vec<(SnapshotId, u64)> = group.iter().map(|s| (s.id, s.time_unix_ms)).collect();
        let decisions = retention::apply(&policy, &times);
        if !how.json {
            println!("image name {n}:");
        }
        for d in &decisions {
            let label = group
                .iter()
                .find(|s| s.id == d.id)
                .and_then(|s| s.label.clone());
            let reasons: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
            if !d.keep() {
                remove.push(d.id);
            }
            if how.json {
                rows.push(json!({
                    "id": d.id.0,
                    "name": n,
                    "label": label,
                    "time": utc(d.time_unix_ms),
                    "time_unix_ms": d.time_unix_ms,
                    "keep": d.keep(),
                    "reasons": reasons,
                }));
            } else {
                println!(
                    "  {:<6} {:>4}  {}  {:<20}  {}",
                    if d.keep() { "keep" } else { "remove" },
                    d.id.0,
                    utc(d.time_unix_ms),
                    label.as_deref().unwrap_or("-"),
                    if d.keep() {
                        reasons.join(", ")
                    } else {
                        "no rule keeps it".into()
                    }
                );
            }
        }
    }
    remove.sort();
    let mut gc_report = None;
    if !how.dry_run {
        if !remove.is_empty() {
            store.delete(&remove)?;
        }
        if how.prune {
            gc_report = Some(store.gc()?);
        }
    }
    let removed: Vec<u64> = remove.iter().map(|i| i.0).collect();
    if how.json {
        println!(
            "{}",
            json!({
                "dry_run": how.dry_run,
                "snapshots": rows,
                "removed": removed,
                "freed_bytes": gc_report.map(|g| g.bytes_freed),
            })
        );
    } else {
        let ids: Vec<String> = removed.iter().map(u64::to_string).collect();
        let verb = if how.dry_run {
            "would remove"
        } else {
            "removed"
        };
        if ids.is_empty() {
            println!("nothing to remove");
        } else {
            println!("{verb} {} snapshot(s): {}", ids.len(), ids.join(", "));
        }
        match gc_report {
            Some(g) => println!(
                "freed {} ({} -> {})",
                HumanBytes(g.bytes_freed),
                HumanBytes(g.bytes_before),
                HumanBytes(g.bytes_after)
            ),
            None if !how.dry_run && !ids.is_empty() => {
                println!("run `pagesnap gc` (or forget --prune) to reclaim their space")
            }
            None => {}
        }
    }
    Ok(OK)
}

/// The main job on a built-in default: a sample image through snapshot, change, snapshot, restore.
fn demo(quiet: bool) -> Result<i32> {
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = work.path();
    let image = dir.join("disk.img");
    let store_dir = dir.join("store");
    const MIB: u64 = 1 << 20;
    let pages = 32 * MIB / 4096;
    // A sample image: a quarter zero pages, a quarter repeating one of 64 blocks, the rest unique.
    let mut data = vec![0u8; (32 * MIB) as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for p in 0..pages as usize {
        let page = &mut data[p * 4096..(p + 1) * 4096];
        match p % 4 {
            0 => {}
            1 => page
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = ((p % 64) * 7 + i) as u8),
            _ => page
                .chunks_mut(8)
                .for_each(|c| c.copy_from_slice(&next().to_le_bytes())),
        }
    }
    std::fs::write(&image, &data).context("writing the sample image")?;
    let ctx = Ctx::new(Some(store_dir.clone()), quiet, None);
    println!("pagesnap demo in {}", dir.display());
    println!(
        "sample image: {} ({} pages, a quarter of them zero)",
        HumanBytes(32 * MIB),
        pages
    );
    Store::init(&store_dir, StoreOptions::default())?;
    let mut store = ctx.open(Mode::Write)?;
    let first = snapshot_image(&mut store, &image, Some("first".into()), &|_| {})?;
    println!(
        "snapshot {}: {} pages changed, {} written ({} data + {} metadata) in {:.3} s",
        first.id,
        first.pages_changed,
        first.pages_written,
        HumanBytes(first.data_bytes),
        HumanBytes(first.meta_bytes),
        first.seconds
    );
    // Change about 1% of the pages in place and grow the image by 1 MiB.
    let original = data.clone();
    let changed = pages / 100;
    for i in 0..changed as usize {
        let p = (i * 97 + 13) % pages as usize;
        data[p * 4096..p * 4096 + 64].copy_from_slice(&[0xA5; 64]);
    }
    data.extend((0..MIB).map(|i| (i % 251) as u8));
    std::fs::write(&image, &data).context("changing the sample image")?;
    let second = snapshot_image(&mut store, &image, Some("second".into()), &|_| {})?;
    println!(
        "changed {} pages and grew the image by {}; snapshot {}: {} pages changed, {} written ({} data + {} metadata) in {:.3} s",
        changed,
        HumanBytes(MIB),
        second.id,
        second.pages_changed,
        second.pages_written,
        HumanBytes(second.data_bytes),
        HumanBytes(second.meta_bytes),
        second.seconds
    );
    for (id, want) in [(first.id, &original), (second.id, &data)] {
        let out = dir.join(format!("restored-{id}.img"));
        let r = restore_image(&store, id, &out, &|_| {})?;
        let got = std::fs::read(&out).context("reading the restored image")?;
        if &got != want {
            bail!("restored snapshot {id} differs from the image it was taken of");
        }
        println!(
            "restored snapshot {id}: {} byte-identical to the original in {:.3} s",
            HumanBytes(r.image_size),
            r.seconds
        );
    }
    let check = store.verify(&[])?;
    if !check.is_clean() {
        bail!("verify found damage: {:?}", check.damage);
    }
    let space = store.check()?;
    let logical = first.image_size + second.image_size;
    println!(
        "store: 2 snapshots, {} logical, {} stored, dedup ratio {:.2}x; verify clean",
        HumanBytes(logical),
        HumanBytes(space.record_bytes),
        logical as f64 / space.record_bytes.max(1) as f64
    );
    Ok(OK)
}
