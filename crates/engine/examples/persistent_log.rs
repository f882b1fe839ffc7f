//! An OS-style user of the engine: a process keeps a hash-chained log in its persistent address
//! space, snapshots every 100 appends, is killed with SIGKILL, and restarts from its snapshot.
//!
//! `cargo run --release -p pagesnap-engine --example persistent_log` runs the demo: it starts the
//! worker (`persistent_log run DIR`) three times, kills the first two with SIGKILL after they
//! report a few snapshots, and checks after every restart that the log is intact and holds at
//! least every append the killed process had confirmed as snapshotted.

use pagesnap_engine::Space;
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::{Mode, Store, StoreError, StoreOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const HEADER: u64 = 0x1000_0000;
const ENTRIES: u64 = 0x1000_1000;
const EVERY: u64 = 100;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn read_u64(space: &Space, addr: u64) -> Result<u64, Box<dyn std::error::Error>> {
    let mut b = [0u8; 8];
    space.read(VirtAddr(addr), &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Opens (or creates) the space and checks the log; returns it with its length and chain.
fn open(dir: &Path) -> Result<(Space, u64, u64), Box<dyn std::error::Error>> {
    let store = match Store::open(dir, Mode::Write) {
        Ok((s, _)) => s,
        Err(StoreError::NotAStore { .. }) => Store::init(dir, StoreOptions::default())?,
        Err(e) => return Err(e.into()),
    };
    let (space, opened) = Space::open_lazy(store)?;
    for (id, why) in &opened.damaged {
        eprintln!("skipped damaged snapshot {id}: {why}");
    }
    if opened.snapshot.is_none() {
        space.map(VirtAddr(HEADER), 4096)?;
        return Ok((space, 0, 0));
    }
    let count = read_u64(&space, HEADER)?;
    let chain = read_u64(&space, HEADER + 8)?;
    let mut c = 0u64;
    for i in 0..count {
        let value = read_u64(&space, ENTRIES + i * 16)?;
        let after = read_u64(&space, ENTRIES + i * 16 + 8)?;
        if value != mix(i) || after != mix(c ^ value) {
            return Err(format!("log entry {i} is corrupt").into());
        }
        c = after;
    }
    if c != chain {
        return Err("log header does not match its entries".into());
    }
    Ok((space, count, chain))
}

/// The worker: append forever (or `limit` entries), snapshotting every 100.
fn run(dir: &Path, limit: Option<u64>) -> Result<(), Box<dyn std::error::Error>> {
    let (space, mut count, mut chain) = open(dir)?;
    println!("restored {count} entries");
    let stop = limit.map(|l| count + l);
    while stop.is_none_or(|s| count < s) {
        let at = ENTRIES + count * 16;
        if at.is_multiple_of(4096) || count == 0 {
            space.map(VirtAddr(at & !4095), 4096)?;
        }
        let value = mix(count);
        chain = mix(chain ^ value);
        let mut entry = [0u8; 16];
        entry[..8].copy_from_slice(&value.to_le_bytes());
        entry[8..].copy_from_slice(&chain.to_le_bytes());
        space.write(VirtAddr(at), &entry)?;
        count += 1;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&count.to_le_bytes());
        header[8..].copy_from_slice(&chain.to_le_bytes());
        space.write(VirtAddr(HEADER), &header)?;
        if count.is_multiple_of(EVERY) {
            let r = space.snapshot()?;
            println!(
                "snapshotted {count} entries as snapshot {} (pause {:?})",
                r.id, r.pause
            );
        }
    }
    Ok(())
}

fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut confirmed = 0u64;
    for (round, kill_after) in [(1, Some(3)), (2, Some(5)), (3, None)] {
        let mut cmd = Command::new(&exe);
        cmd.arg("run").arg(dir.path());
        if kill_after.is_none() {
            cmd.arg("250");
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut snapshots = 0;
        for line in BufReader::new(out).lines() {
            let line = line?;
            if let Some(n) = line
                .strip_prefix("restored ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                if n < confirmed {
                    return Err(format!(
                        "run {round} restored {n} entries, but {confirmed} were confirmed"
                    )
                    .into());
                }
                println!("run {round}: restarted with {n} intact entries (at least the {confirmed} confirmed)");
            }
            if let Some(n) = line
                .strip_prefix("snapshotted ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                confirmed = n;
                snapshots += 1;
                if kill_after == Some(snapshots) {
                    child.kill()?;
                    println!("run {round}: killed with SIGKILL after confirming {n} entries");
                    break;
                }
            }
        }
        let status = child.wait()?;
        if kill_after.is_none() && !status.success() {
            return Err(format!("run {round} failed: {status}").into());
        }
    }
    let (_, count, _) = open(dir.path())?;
    println!("final: {count} entries, chain verified");
    if count < confirmed {
        return Err("lost confirmed entries".into());
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") if args.len() >= 2 => run(
            Path::new(&args[1]),
            args.get(2).and_then(|a| a.parse().ok()),
        ),
        None | Some("demo") => demo(),
        _ => Err("usage: persistent_log [demo | run DIR [APPENDS]]".into()),
    };
    if let Err(e) = result {
        eprintln!("persistent_log: {e}");
        std::process::exit(2);
    }
}
