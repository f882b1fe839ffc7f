#!/usr/bin/env bash
# Late write errors from a real file system: mounts scripts/errfs.py (a FUSE server that fails
# writes on demand, as a FUSE, NFS or CIFS server can at writeback) and runs
# crates/store/tests/writeback_errors.rs on it. Needs root, /dev/fuse, python3 and the right to
# mount; says so and exits 0 where the machine has not got them (WRITEBACK_ERRORS_STRICT=1 makes
# that a failure). Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || [ ! -w /dev/fuse ] || ! command -v python3 >/dev/null; then
  echo "writeback-errors: skipped (needs root, /dev/fuse and python3)"
  exit 0
fi
W=$(mktemp -d)
mkdir -p "$W/mnt"
python3 scripts/errfs.py "$W/mnt" "$W/control" 2>"$W/errfs.log" &
pid=$!
cleanup() { umount -l "$W/mnt" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
# Wait for the server's mount (or its death: a container without the right to mount).
for _ in $(seq 100); do
  mountpoint -q "$W/mnt" && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if ! mountpoint -q "$W/mnt"; then
  echo "writeback-errors: SKIPPED: errfs could not mount here (no right to mount FUSE?); its log:"
  sed 's/^/  /' "$W/errfs.log"
  [ "${WRITEBACK_ERRORS_STRICT:-0}" = 1 ] && exit 1
  exit 0
fi
PAGESNAP_ERRFS_DIR="$W/mnt" PAGESNAP_ERRFS_CONTROL="$W/control" \
  cargo test --release -q -p pagesnap-store --test writeback_errors -- --test-threads=1
echo "writeback-errors: $(grep -c 'failed with errno' "$W/errfs.log") writes failed on purpose"
