#!/usr/bin/env bash
# Real `zfs send` streams for benchmarks/skip.py, made inside the OpenZFS VM:
#   scripts/openzfs-vm run -- bash benchmarks/make-streams.sh [OUT_DIR]
# Datasets of 48 MiB written each: text-like, random, a VM image file (zero runs between random and
# text extents), many small files (all compression=lz4), text/mixed on zstd and gzip, and an encrypted
# text dataset; each sent plain and with -L -e -c (the encrypted one raw, -w).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/.cache/streams}
mkdir -p "$OUT"
cd /tmp
truncate -s 2G streams.img
zpool create -f bstreams /tmp/streams.img
trap 'zpool destroy bstreams; rm -f /tmp/streams.img /tmp/streams.key' EXIT
echo "correct horse battery staple" > /tmp/streams.key
fill() {  # DIR KIND
    PYTHONPATH="$REPO:$REPO/benchmarks" "$REPO/.venv/bin/python" -c \
        'import sys; from pathlib import Path; import datakinds; datakinds.write(Path(sys.argv[1]), sys.argv[2], 48 << 20)' \
        "$1" "$2"
}
for spec in text:lz4 random:lz4 vmimage:lz4 smallfiles:lz4 mixed:zstd mixed:gzip; do
    kind=${spec%:*} comp=${spec#*:} name=${spec%:*}-${spec#*:}
    zfs create -o compression="$comp" "bstreams/$name"
    fill "/bstreams/$name" "$kind"
    zfs snapshot "bstreams/$name@s"
    zfs send "bstreams/$name@s" > "$OUT/$name.plain.zfs"
    zfs send -L -e -c "bstreams/$name@s" > "$OUT/$name.c.zfs"
done
zfs create -o compression=lz4 -o encryption=on -o keyformat=passphrase -o keylocation=file:///tmp/streams.key \
    bstreams/enc
fill /bstreams/enc text
zfs snapshot bstreams/enc@s
zfs send -w bstreams/enc@s > "$OUT/text-lz4.w.zfs"
ls -la "$OUT"
