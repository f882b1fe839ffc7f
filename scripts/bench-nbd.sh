#!/usr/bin/env bash
# `pagesnap serve` against `qemu-nbd -e 0` (shared by any number of clients, which advertises
# multi-conn as pagesnap does) serving the same raw file, in the same run, with the same client:
# nbdcopy with 1 MiB requests on a 256 MiB file of random bytes.
#
# - read:  nbdcopy URI null:            (the file is in the page cache for both servers)
# - write: nbdcopy --flush SRC URI      (into a fresh sparse file; the final flush is timed)
# Each is the median of RUNS runs (default 5), servers alternating. Then the cost of a snapshot
# while serving: after WRITTEN scattered 4 KiB writes through the server, `pagesnap snapshot
# IMAGE --json` (asked of the server), against a full read of the same image.
#
# Run by hand, never in CI: `bash scripts/bench-nbd.sh [WORKDIR]` (needs qemu-utils and
# libnbd-bin, installed with apt-get when missing; about 1 GiB free in WORKDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
RUNS=${RUNS:-5}
mkdir -p "$W"
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2"; }; }
need qemu-nbd qemu-utils; need nbdcopy libnbd-bin; need qemu-io qemu-utils
cargo build --release -q -p pagesnap
P=$PWD/target/release/pagesnap
rm -rf "$W"/{store,*.img,*.sock}
head -c 256M /dev/urandom > "$W/src.img"
cp "$W/src.img" "$W/disk.img"
$P --store "$W/store" --quiet init >/dev/null

wait_sock() { for _ in $(seq 500); do [ -S "$1" ] && nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1 && return 0; sleep 0.01; done; echo "no server on $1" >&2; exit 1; }
start() { # start pagesnap|qemu IMAGE: sets PID and U
  rm -f "$W/s.sock"
  case $1 in
    pagesnap) $P --store "$W/store" --quiet serve "$2" --socket "$W/s.sock" >/dev/null & PID=$! ;;
    qemu) qemu-nbd -f raw -e 0 -t -k "$W/s.sock" "$2" & PID=$! ;;
  esac
  wait_sock "$W/s.sock"; U="nbd+unix:///?socket=$W/s.sock"
}
stop() { kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; }
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A R
for run in $(seq "$RUNS"); do
  for srv in pagesnap qemu; do
    cat "$W/disk.img" >/dev/null
    start $srv "$W/disk.img"
    R[$srv.read]+="$(secs nbdcopy --request-size=1048576 "$U" null:) "
    stop
    rm -f "$W/target.img"; truncate -s 256M "$W/target.img"; sync
    start $srv "$W/target.img"
    R[$srv.write]+="$(secs nbdcopy --flush --request-size=1048576 "$W/src.img" "$U") "
    stop
    cmp "$W/src.img" "$W/target.img"
  done
done
med() { echo "${R[$1]}" | tr ' ' '\n' | grep . | median; }
mibs() { echo "scale=0; 256 / $1" | bc; }
echo
echo "| nbdcopy, 256 MiB, 1 MiB requests (median of $RUNS) | pagesnap serve | qemu-nbd -e 0 | ratio |"
echo "|---|---|---|---|"
for op in read write; do
  p=$(med pagesnap.$op); q=$(med qemu.$op)
  printf '| %s | %.3f s (%s MiB/s) | %.3f s (%s MiB/s) | %.2fx |\n' \
    "$([ $op = read ] && echo 'read (to null:)' || echo 'write + flush (into a sparse file)')" \
    "$p" "$(mibs "$p")" "$q" "$(mibs "$q")" "$(echo "$q / $p" | bc -l)"
done

# A snapshot while serving: O(pages written), not O(image).
WRITTEN=${WRITTEN:-256}
$P --store "$W/store" --quiet snapshot "$W/disk.img" --json >/dev/null   # a base
start pagesnap "$W/disk.img"
args=(); for i in $(seq 0 $((WRITTEN - 1))); do args+=(-c "write -P $((i % 200 + 1)) $(( (i * 7919 % 65536) * 4096 )) 4096"); done
qemu-io -f raw "$U" "${args[@]}" >/dev/null
served=$($P --store "$W/store" --quiet snapshot "$W/disk.img" --json)
full=$($P --store "$W/store" --quiet snapshot "$W/disk.img" --reread --json)
stop
get() { echo "$1" | sed -E "s/.*\"$2\":([0-9.e-]+).*/\1/"; }
echo
echo "| snapshot while serving, 256 MiB image | pages read | seconds |"
echo "|---|---|---|"
printf '| after %s scattered 4 KiB writes (tracked) | %s | %.4f |\n' "$WRITTEN" "$(get "$served" pages_read)" "$(get "$served" seconds)"
printf '| the same image read whole (--reread) | %s | %.4f |\n' "$(get "$full" pages_read)" "$(get "$full" seconds)"
