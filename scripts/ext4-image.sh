#!/usr/bin/env bash
# The benchmarks' 1 GiB ext4 image "from real files": `mke2fs -d` from /usr/lib/x86_64-linux-gnu
# and /usr/share/doc. `bash scripts/ext4-image.sh OUT` builds OUT unless it exists.
set -euo pipefail
OUT=$1
[ -f "$OUT" ] && exit 0
files=$(mktemp -d "$(dirname "$OUT")/files.XXXXXX")
cp -a /usr/lib/x86_64-linux-gnu "$files/lib" 2>/dev/null || true
cp -a /usr/share/doc "$files/doc" 2>/dev/null || true
mke2fs -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 -d "$files" "$OUT" 1G
rm -rf "$files"
