#!/usr/bin/env bash
# A store on S3 against a store in a directory, side by side in one run (issue 19): first
# snapshot, restore and an incremental snapshot of a 1 GiB ext4 image changed by ~1%, to a local
# S3-compatible server (moto's, started here on 127.0.0.1) and to a directory on this disk. The
# two alternate which goes first; every restore is compared with the image (`cmp`). Prints each
# round, the median time ratios (S3 / directory; target <= 2) and the bytes an incremental
# uploads against the bytes it adds to the directory store (target <= 1.1).
#
# Run by hand: `bash scripts/bench-s3.sh [WORKDIR]`. `IMG=` names an image (default: one built
# like scripts/bench-peers.sh does); `ROUNDS=` (default 3); `COMPRESSION=` for `init`.
# `PAGESNAP_MOTO_SERVER=` names moto_server (default: a virtualenv in WORKDIR, installed from
# PyPI on first use). Needs python3, e2fsprogs, ~4 GiB free in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
mkdir -p "$W"
ROUNDS=${ROUNDS:-3}
cargo build --release -q -p pagesnap
P=$PWD/target/release/pagesnap
if [ -z "${IMG:-}" ]; then
  IMG=$W/disk.img
  bash scripts/ext4-image.sh "$IMG"
fi
MOTO=${PAGESNAP_MOTO_SERVER:-$W/moto-venv/bin/moto_server}
if [ ! -x "$MOTO" ]; then
  python3 -m venv "$W/moto-venv" && "$W/moto-venv/bin/pip" install -q 'moto[server]'
fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
MPID=$!
trap 'kill $MPID 2>/dev/null' EXIT
for _ in $(seq 1 200); do curl -s -o /dev/null -X PUT "http://127.0.0.1:$PORT/bench" && break; sleep 0.1; done
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
  AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true PAGESNAP_CACHE_DIR=$W/cache
echo "image: $(stat -c %s "$IMG") bytes; $(nproc) cores; $(stat -f -c %T "$W"); moto $("$MOTO" --version 2>/dev/null || true)"
secs() { local s e; sync; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
# Changes ~1% of the image's 4 KiB pages (every 97th page of its first half gets new bytes).
change() { python3 - "$1" <<'PY'
import os, sys
f = os.open(sys.argv[1], os.O_RDWR)
n = os.fstat(f).st_size // 4096
for p in range(0, n // 2, 50):
    os.pwrite(f, os.urandom(4096), p * 4096)
os.close(f)
PY
}
run() { # run STORE: init, first snapshot, restore, incremental; prints "first restore incr added"
  local s=$1 tag=$2 a b c
  "$P" --store "$s" --quiet init --compression "${COMPRESSION:-auto}" >/dev/null
  cp --reflink=auto "$IMG" "$W/img-$tag"; cat "$W/img-$tag" >/dev/null
  a=$(secs "$P" --store "$s" --quiet snapshot "$W/img-$tag")
  rm -f "$W/r-$tag.img"
  b=$(secs bash -c "'$P' --store '$s' --quiet restore 1 '$W/r-$tag.img' && sync")
  cmp -s "$W/img-$tag" "$W/r-$tag.img" || { echo "$tag: the restore differs from the image" >&2; exit 1; }
  change "$W/img-$tag"
  local j; sync; local t0; t0=$(date +%s.%N)
  j=$("$P" --store "$s" --quiet snapshot "$W/img-$tag" --json)
  c=$(echo "$(date +%s.%N) - $t0" | bc)
  echo "$a $b $c $(echo "$j" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["bytes_written"], v.get("transfer",{}).get("bytes_uploaded",0))')"
  rm -f "$W/r-$tag.img" "$W/img-$tag"
}
rf=(); rr=(); ri=(); ru=()
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$W/store" "$W/cache"
  if (( r % 2 )); then
    l=$(run "$W/store" dir); o=$(run "s3://bench/r$r" s3)
  else
    o=$(run "s3://bench/r$r" s3); l=$(run "$W/store" dir)
  fi
  read -r la lb lc ladd _ <<<"$l"; read -r oa ob oc oadd oup <<<"$o"
  x=$(echo "scale=3; $oa/$la" | bc); y=$(echo "scale=3; $ob/$lb" | bc); z=$(echo "scale=3; $oc/$lc" | bc)
  u=$(echo "scale=3; $oup/$ladd" | bc)
  rf+=("$x"); rr+=("$y"); ri+=("$z"); ru+=("$u")
  echo "round $r: first snapshot s3 $oa s vs dir $la s (${x}x) | restore + sync $ob s vs $lb s (${y}x) | incremental $oc s vs $lc s (${z}x), uploaded $oup B vs $ladd B added (${u}x)"
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median ratio s3/dir: first snapshot $(med "${rf[@]}")x, restore $(med "${rr[@]}")x, incremental $(med "${ri[@]}")x (target <= 2); incremental upload / bytes added $(med "${ru[@]}")x (target <= 1.1); every restore byte-identical"
rm -rf "$W/store" "$W/cache"
