#!/usr/bin/env bash
# First snapshot and restore of a 1 GiB ext4 image: `pagesnap` against `qemu-img convert` followed
# by `sync`, side by side in one run (issues 13 and 14). Each timed command starts after a `sync`
# with its input read into the page cache, and the two tools alternate which goes first; every
# restore is compared with the image (`cmp`). Prints each round and the median ratios.
#
# Run by hand: `bash scripts/bench-image-vs-qemu.sh [WORKDIR]`, with `IMG=` naming an image or
# none (then one is built like scripts/bench-peers.sh does: `mke2fs -d` from /usr/lib/x86_64-linux-gnu
# and /usr/share/doc). `ROUNDS=` (default 5). `COMPRESSION=` is passed to `pagesnap init
# --compression` (default: the store's default, auto). `QEMU_COMPRESS=zstd|zlib` makes the peer
# compress too (`qemu-img convert -c -O qcow2 -o compression_type=...`), the like-for-like peer of
# a compressed store. Needs qemu-img, e2fsprogs, ~4 GiB free in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
mkdir -p "$W"
ROUNDS=${ROUNDS:-5}
cargo build --release -q -p pagesnap
P=$PWD/target/release/pagesnap
if [ -z "${IMG:-}" ]; then
  IMG=$W/disk.img
  bash scripts/ext4-image.sh "$IMG"
fi
echo "image: $(stat -c %s "$IMG") bytes, $(du -B1 "$IMG" | cut -f1) allocated; $(nproc) cores; $(stat -f -c %T "$W")"
secs() { local s e; sync; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
snap_ps() { rm -rf "$W/store"; "$P" --store "$W/store" --quiet init --compression "${COMPRESSION:-auto}" >/dev/null; cat "$IMG" >/dev/null; secs "$P" --store "$W/store" --quiet snapshot "$IMG"; }
QOPTS=${QEMU_COMPRESS:+-c -o compression_type=$QEMU_COMPRESS}
snap_qe() { rm -f "$W/v.qcow2"; cat "$IMG" >/dev/null; secs bash -c "qemu-img convert $QOPTS -O qcow2 '$IMG' '$W/v.qcow2' && sync"; }
rest_ps() { rm -f "$W/r.img"; cat "$W"/store/seg-* >/dev/null; secs bash -c "'$P' --store '$W/store' --quiet restore 1 '$W/r.img' && sync"; }
rest_qe() { rm -f "$W/q.img"; cat "$W/v.qcow2" >/dev/null; secs bash -c "qemu-img convert -O raw '$W/v.qcow2' '$W/q.img' && sync"; }
rs=(); rr=()
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then a=$(snap_ps); b=$(snap_qe); else b=$(snap_qe); a=$(snap_ps); fi
  if (( r % 2 )); then c=$(rest_ps); d=$(rest_qe); else d=$(rest_qe); c=$(rest_ps); fi
  cmp -s "$IMG" "$W/r.img" || { echo "round $r: the restore differs from the image"; exit 1; }
  x=$(echo "scale=3; $a/$b" | bc); y=$(echo "scale=3; $c/$d" | bc); rs+=("$x"); rr+=("$y")
  echo "round $r: snapshot $a s vs qemu-img convert ${QOPTS:+$QOPTS }-O qcow2 + sync $b s (${x}x) | restore + sync $c s vs qemu-img convert -O raw + sync $d s (${y}x)"
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median ratio: first snapshot $(med "${rs[@]}")x, restore $(med "${rr[@]}")x (target <= 1); every restore byte-identical"
rm -rf "$W/store" "$W/v.qcow2" "$W/r.img" "$W/q.img"
