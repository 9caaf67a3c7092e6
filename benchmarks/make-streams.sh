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
  "$REPO/.venv/bin/python" - "$2" "$1" <<'PY'
import os, random, sys
sys.path.insert(0, os.environ["REPO"])
from pathlib import Path
from zchunk import lab
kind, root = sys.argv[1], Path(sys.argv[2])
size = 48 << 20
if kind == "text":
    lab.write_dataset(root / "d", size, seed=5, compressible_fraction=1.0)
elif kind == "mixed":
    lab.write_dataset(root / "d", size, seed=5, compressible_fraction=1.0)
    lab.write_dataset(root / "m", size, seed=6, compressible_fraction=0.5)
elif kind == "random":
    lab.write_dataset(root / "d", size, seed=5, compressible_fraction=0.0)
elif kind == "vmimage":
    rng = random.Random(7)
    with open(root / "disk.img", "wb") as f:
        while f.tell() < size:
            r, n = rng.random(), rng.choice([64, 256, 1024]) * 1024
            f.write(bytes(n) if r < 0.4 else rng.randbytes(n) if r < 0.7
                    else (b"config line %d\n" % rng.randrange(10**6)) * (n // 20))
elif kind == "smallfiles":
    rng, n = random.Random(9), 0
    while n < size:
        d = root / ("d%03d" % rng.randrange(200))
        d.mkdir(exist_ok=True)
        k = rng.randrange(200, 16000)
        (d / ("f%06d" % n)).write_bytes(rng.randbytes(k // 2) + b"x = %d\n" % k * (k // 16))
        n += k
PY
}
export REPO
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
