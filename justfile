# pagesnap recipes. CI runs `.ci/run`, which is `just pre` without needing just.

default: pre

# Everything CI checks: format, lints, tests, a reduced loom run.
pre:
    bash .ci/run

# The test suite (the README's test command).
test:
    cargo test --workspace --release

fmt:
    cargo fmt --all

clippy:
    cargo clippy --workspace --all-targets -- -D warnings

# Model-check the page table's protocol with loom (all models, preemption bound 2: ~10 minutes),
# and the engine's copy-on-write shards.
loom:
    RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p pagesnap-pagetable --release --test loom --target-dir target/loom
    RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p pagesnap-engine --release --lib --target-dir target/loom cow::loom_model

# The reduced loom run CI does (preemption bound 1, the long model skipped).
loom-ci:
    RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=1 cargo test -p pagesnap-pagetable --release --test loom --target-dir target/loom -- --skip across_a_split
    RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p pagesnap-engine --release --lib --target-dir target/loom cow::loom_model

# The benchmark tables (quick mode, under 3 minutes), plus the examples' figures.
bench:
    cargo run --release -p pagesnap-bench
    cargo run --release -p pagesnap-store --example incremental
    cargo run --release -p pagesnap-engine --example pause
    cargo run --release -p pagesnap-store --example commit_cost
    cargo run --release -p pagesnap-engine --example checkpoint_loop

# The full benchmark run (8 Mi mappings, 1 Mi-page snapshots).
bench-full:
    cargo run --release -p pagesnap-bench -- --full

# The CLI against restic, borg and qemu-img (by hand: installs the peers with apt-get).
bench-peers:
    bash scripts/bench-peers.sh

# A store on S3 (a local moto server) against a store in a directory: snapshot, restore, incremental.
bench-s3:
    bash scripts/bench-s3.sh

# The main job: the CLI's demo.
demo:
    cargo run --release -p pagesnap -- demo

# API docs for every crate, warnings denied.
doc:
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Fuzz the store's decoders and open path (nightly + cargo-fuzz; `cargo install cargo-fuzz`).
fuzz seconds="60":
    cd fuzz && cargo +nightly fuzz run decode -- -max_total_time={{seconds}}
    cd fuzz && cargo +nightly fuzz run open_store -- -max_total_time={{seconds}} -rss_limit_mb=1024

# The crash campaign at scale: about a million store crash states, 100k corruptions, 5k engine
# state-machine cases (tens of minutes on 2 cores).
crash-long:
    PAGESNAP_CRASH_WORKLOADS=1800 cargo test --release -p pagesnap-store --test crash -- --nocapture
    PAGESNAP_CORRUPTIONS=100000 cargo test --release -p pagesnap-store --test corruption -- --nocapture
    PAGESNAP_ENGINE_CRASH_CASES=5000 cargo test --release -p pagesnap-engine --test crash_machine -- --nocapture

# Late write errors from a real file system: a FUSE server failing writes with EIO, EINVAL,
# ENOSYS and EOPNOTSUPP under a store (root and /dev/fuse; `.ci/run` runs it too).
writeback-errors:
    bash scripts/writeback-errors.sh
