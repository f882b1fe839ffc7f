//! # pagesnap
//!
//! The command-line tool: incremental, page-granular snapshots of raw disk images and byte-identical
//! restore of any of them, on a pagesnap store (`crates/store`), with the image logic of the engine
//! (`pagesnap_engine::image`). `pagesnap --help` lists the commands; `pagesnap demo` shows them
//! working on a sample image.
//!
//! Exit status: 0 success, 1 `verify` found damage, 2 any other error (one line on stderr naming
//! the file and what to do).

mod cli;
mod commands;
mod copy;
mod keycmd;
mod output;
mod password;
mod serve;

use clap::Parser;

/// mimalloc keeps memory it freed for reuse: a snapshot's large transient maps and buffers then
/// do not fault fresh pages in again and again as with the system allocator (about a tenth of
/// the CPU of a first snapshot of a 1 GiB image went to page faults).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Damage met outside `verify` (a restore reading a damaged page) is exit 2: the
            // command failed. `verify` is the command whose result is damage (exit 1).
            eprintln!("pagesnap: error: {e:#}");
            std::process::exit(2);
        }
    }
}
