#!/usr/bin/env bash
# pagesnap's CLI against restic, borg and qemu-img on a 1 GiB ext4 image built with `mke2fs -d`
# from real files, then changed by about 1% (new files through `debugfs -w`, in-place block
# writes). Times the first snapshot, the incremental snapshot and the restore; measures the store
# bytes after each; checks every restore byte for byte. Prints a markdown table.
#
# Run by hand, never in CI: `bash scripts/bench-peers.sh [WORKDIR]` (installs restic and borg with
# apt-get when they are missing; needs about 6 GiB free in WORKDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
mkdir -p "$W"
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2"; }; }
need restic restic; need borg borgbackup; need qemu-img qemu-utils; need mke2fs e2fsprogs
cargo build --release -q -p pagesnap
P=$PWD/target/release/pagesnap
export RESTIC_PASSWORD=bench BORG_PASSPHRASE= BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
rm -rf "$W"/{files,store,restic,borg,out,*.img,*.qcow2}
mkdir -p "$W/out"

# Real files: libraries and documentation, up to ~650 MiB.
bash scripts/ext4-image.sh "$W/disk.img"
cp "$W/disk.img" "$W/v1.img"

# Each timed command starts with writeback settled, so no tool pays for the previous one.
secs() { local s e; sync; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
bytes() { du -sb "$@" | awk '{s+=$1} END {print s}'; }

# First snapshot.
$P --store "$W/store" --quiet init >/dev/null
restic init --repo "$W/restic" -q >/dev/null
borg init -e none "$W/borg" >/dev/null 2>&1
t_ps1=$(secs $P --store "$W/store" --quiet snapshot "$W/disk.img")
t_re1=$(secs restic --repo "$W/restic" backup -q "$W/disk.img")
t_bo1=$(secs borg create "$W/borg::v1" "$W/disk.img")
t_qe1=$(secs qemu-img convert -O qcow2 "$W/disk.img" "$W/v1.qcow2")
# pagesnap's times include the fsync that makes a snapshot durable; qemu-img convert is also timed
# with a sync after it, so both rows pay for durability.
rm -f "$W/v1s.qcow2"; t_qe1s=$(secs bash -c "qemu-img convert -O qcow2 '$W/disk.img' '$W/v1s.qcow2' && sync")
b_ps1=$(bytes "$W/store"); b_re1=$(bytes "$W/restic"); b_bo1=$(bytes "$W/borg"); b_qe1=$(bytes "$W/v1.qcow2")

# Change about 1%: ~6 MiB of new files through the filesystem, ~4 MiB of scattered block writes.
head -c 6291456 /dev/urandom > "$W/new.bin"
debugfs -w -R "write $W/new.bin new.bin" "$W/disk.img" >/dev/null 2>&1
for i in $(seq 0 1023); do
  dd if=/dev/urandom of="$W/disk.img" bs=4096 count=1 seek=$(( (i * 2654435761) % 262144 )) conv=notrunc status=none
done
cp "$W/disk.img" "$W/v2.img"

# Incremental snapshot.
t_ps2=$(secs $P --store "$W/store" --quiet snapshot "$W/disk.img")
t_re2=$(secs restic --repo "$W/restic" backup -q "$W/disk.img")
t_bo2=$(secs borg create "$W/borg::v2" "$W/disk.img")
t_qe2=$(secs qemu-img convert -O qcow2 -B "$W/v1.qcow2" -F qcow2 "$W/disk.img" "$W/v2.qcow2")
b_ps2=$(bytes "$W/store"); b_re2=$(bytes "$W/restic"); b_bo2=$(bytes "$W/borg"); b_qe2=$(bytes "$W/v1.qcow2" "$W/v2.qcow2")

# Restore the incremental snapshot, check byte for byte.
t_psr=$(secs $P --store "$W/store" --quiet restore 2 "$W/out/ps.img")
t_rer=$(secs restic --repo "$W/restic" restore latest -q --target "$W/out/restic")
t_bor=$(secs bash -c "cd '$W/out' && mkdir -p borg && cd borg && borg extract '$W/borg::v2'")
t_qer=$(secs qemu-img convert -O raw "$W/v2.qcow2" "$W/out/qemu.img")
t_qers=$(secs bash -c "qemu-img convert -O raw '$W/v2.qcow2' '$W/out/qemu2.img' && sync")
cmp "$W/v2.img" "$W/out/ps.img"
cmp "$W/v2.img" "$W/out/restic$W/disk.img"
cmp "$W/v2.img" "$W/out/borg$W/disk.img"
cmp "$W/v2.img" "$W/out/qemu.img"
$P --store "$W/store" --quiet restore 1 "$W/out/ps1.img" && cmp "$W/v1.img" "$W/out/ps1.img"

r() { echo "scale=2; $1 / $2" | bc; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
echo "pagesnap's store: $($P --store "$W/store" compression) compression"
echo "| tool | first snapshot (s) | store after (MiB) | incremental (s) | bytes added (MiB) | store after both (MiB) | restore (s) | restore byte-identical |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
echo "| pagesnap | $t_ps1 | $(mib $b_ps1) | $t_ps2 | $(mib $((b_ps2 - b_ps1))) | $(mib $b_ps2) | $t_psr | yes |"
echo "| restic $(restic version | awk '{print $2}') | $t_re1 | $(mib $b_re1) | $t_re2 | $(mib $((b_re2 - b_re1))) | $(mib $b_re2) | $t_rer | yes |"
echo "| borg $(borg --version | awk '{print $2}') | $t_bo1 | $(mib $b_bo1) | $t_bo2 | $(mib $((b_bo2 - b_bo1))) | $(mib $b_bo2) | $t_bor | yes |"
echo "| qemu-img convert (qcow2, -B backing) | $t_qe1 | $(mib $b_qe1) | $t_qe2 | $(mib $((b_qe2 - b_qe1))) | $(mib $b_qe2) | $t_qer | yes |"
echo "| qemu-img convert, then sync | $t_qe1s | | | | | $t_qers | yes |"
echo
echo "Store size pagesnap/restic: $(r $b_ps2 $b_re2) after both snapshots, $(r $b_ps1 $b_re1) after the first (issue 16: <= 1)."
echo "Ratios: incremental time pagesnap/restic $(r $t_ps2 $t_re2) (target <= 0.25); bytes added pagesnap/restic $(r $((b_ps2 - b_ps1)) $((b_re2 - b_re1))) (target <= 0.3); first snapshot pagesnap/qemu-img $(r $t_ps1 $t_qe1) ($(r $t_ps1 $t_qe1s) against convert+sync) and restore pagesnap/qemu-img $(r $t_psr $t_qer) ($(r $t_psr $t_qers) against convert+sync) (target <= 1)."
